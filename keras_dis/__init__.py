"""keras_dis: fast knowledge distillation for many classes (DIS), Keras 3."""

from keras_dis.src import diagnostics
from keras_dis.src import distribution
from keras_dis.src import losses
from keras_dis.src import proposals
from keras_dis.src.callbacks import ProposalScheduler
from keras_dis.src.distiller import Distiller
from keras_dis.src.export import export_student
from keras_dis.src.head import SampledDistillationHead
from keras_dis.src.losses import DISLoss
from keras_dis.src.monitor import DistillationMonitor
from keras_dis.src.plotting import plot_monitor
from keras_dis.src.teacher_cache import TeacherCache
from keras_dis.src.teacher_cache import TeacherCacheDataset
from keras_dis.src.teacher_targets import pack_teacher_targets

__version__ = "0.1.0"

__all__ = [
    "DISLoss",
    "DistillationMonitor",
    "Distiller",
    "ProposalScheduler",
    "SampledDistillationHead",
    "TeacherCache",
    "TeacherCacheDataset",
    "diagnostics",
    "distribution",
    "export_student",
    "losses",
    "pack_teacher_targets",
    "plot_monitor",
    "proposals",
]
