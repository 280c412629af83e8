"""Data: readers, format converters, chat-template encoding and the shared ``PreferenceDataModule``."""

from rlft.data.datamodule import PreferenceDataModule
from rlft.data.ranking import RankingDataModule

__all__ = ["PreferenceDataModule", "RankingDataModule"]
