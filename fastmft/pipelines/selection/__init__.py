"""Meta-learned task selection for (pre)training (Luo et al.; docs/design.md section 2): the tasks
and the model holding them (tasks.py), the selector that scores and trains them episode by episode
and its checkpoint (selector.py), and the functional task-utility scorer (utility.py). Their public
names are re-exported here and load on first use."""

from fastmft._lazy import lazy_exports

# public name -> the module of this package that defines it
_EXPORTS = {
    "Episode": ".selector",
    "TaskSelector": ".selector",
    "ClassificationTask": ".tasks",
    "MaskedLMTask": ".tasks",
    "MultiTaskModel": ".tasks",
    "Task": ".tasks",
    "TokenShuffleTask": ".tasks",
    "build_tasks": ".tasks",
    "TaskUtilityScorer": ".utility",
    "clone_task_utility": ".utility",
    "hf_loss": ".utility",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
