"""Meta-learned task selection for (pre)training (Luo et al.; docs/design.md section 2): the tasks
and the model holding them (tasks.py), the selector that scores and trains them episode by episode
and its checkpoint (selector.py), and the functional task-utility scorer (utility.py). Their public
names are re-exported here and load on first use."""

from fastmft._lazy import lazy_exports

# defining module (relative to this package) -> the public names it exports
_EXPORTS = {
    ".config": "SelectConfig",
    ".selector": "Episode TaskSelector",
    ".tasks": "ClassificationTask MaskedLMTask MultiTaskModel Task TokenShuffleTask build_tasks",
    ".utility": "TaskUtilityScorer hf_loss",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
