"""QLoRA / LoRA training of one adapter per task on a prepared-data folder (``lorakit train``)."""

from lorakit.train.loop import TRAIN_LOG, TrainConfig, TrainRecord, TrainResult, read_train_record, train_adapter
from lorakit.train.model import CpuRepackError, assert_not_repacked, repacked_modules
from lorakit.train.sanity import TrainingSanityError

__all__ = ["TRAIN_LOG", "CpuRepackError", "TrainConfig", "TrainRecord", "TrainResult", "TrainingSanityError",
           "assert_not_repacked", "read_train_record", "repacked_modules", "train_adapter"]
