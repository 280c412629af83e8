"""Data: readers, format converters, chat-template encoding and the shared ``PreferenceDataModule``."""

from rlft.data.batches import Batch, PairBatch, PromptBatch, RankingBatch, SFTBatch, Tokens, UnpairedBatch
from rlft.data.datamodule import PreferenceDataModule
from rlft.data.ranking import RankingDataModule

__all__ = [
    "Batch",
    "PairBatch",
    "PreferenceDataModule",
    "PromptBatch",
    "RankingBatch",
    "RankingDataModule",
    "SFTBatch",
    "Tokens",
    "UnpairedBatch",
]
