"""Meta-learned task selection for (pre)training (Luo et al.; docs/design.md section 2): the tasks
and the model holding them (tasks.py), the selector that scores and trains them episode by episode
and its checkpoint (selector.py), and the functional task-utility scorer (utility.py). Their public
names are re-exported here."""

from .selector import Episode, TaskSelector
from .tasks import ClassificationTask, MaskedLMTask, MultiTaskModel, Task, TokenShuffleTask, build_tasks
from .utility import TaskUtilityScorer, clone_task_utility, hf_loss

__all__ = [
    "ClassificationTask",
    "Episode",
    "MaskedLMTask",
    "MultiTaskModel",
    "Task",
    "TaskSelector",
    "TaskUtilityScorer",
    "TokenShuffleTask",
    "build_tasks",
    "clone_task_utility",
    "hf_loss",
]
