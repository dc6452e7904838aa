"""``kd-bench --lm --trl``: TRL's off-policy distillation against the library's one-teacher LM path.

Both sides train the same tiny GPT-2 student (same seed, dropout off) from the same GPT-2 teacher
on the same stdlib blocks, ``size.batch_size`` blocks a step, AdamW, forward KL at T = 1 and no
cross-entropy term:

* ``lm_trl``: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (never generates) and
  ``beta=0`` (forward KL on the dataset's sequences), timed by a ``TrainerCallback``;
* ``lm_one_teacher``: :class:`~kd_lightning.DistillationModule` with
  ``DistillationLoss("mean_probs", alpha=1.0, temperature=1.0)`` over
  :class:`~kd_lightning.models.HuggingFaceLM`.

TRL shifts inside the loss (``L − 1`` positions per block), the library reads labels already
shifted (``L`` positions). ``pip install 'kd-lightning[bench]'`` installs TRL.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from kd_lightning.bench.lm import LMSize
from kd_lightning.bench.workloads import Workload, _trainer
from kd_lightning.data import TextDataModule
from kd_lightning.losses.distillation import DistillationLoss
from kd_lightning.models import HuggingFaceLM
from kd_lightning.modules import DistillationModule
from kd_lightning.teachers import TeacherEnsemble

TRL_PAIR = "lm_trl/lm_one_teacher"
"""TRL's epoch time over the library's: the library's tokens/s ÷ TRL's (target ≥ 1)."""
LEARNING_RATE = 1e-3


def gpt2(vocab_size: int, width: int, layers: int, heads: int, length: int, seed: int) -> Any:
    """A randomly initialised ``GPT2LMHeadModel`` without dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        n_positions=length,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _models(size: LMSize, vocab_size: int, seed: int) -> tuple[Any, Any]:
    student = gpt2(vocab_size, size.d_model, size.n_layers, size.n_heads, size.block_size, seed)
    teacher = gpt2(
        vocab_size,
        size.teacher_d_model,
        size.teacher_layers,
        size.n_heads,
        size.block_size,
        seed + 1,
    )
    return student, teacher


def _collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([row["input_ids"] for row in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def trl_gkd(
    size: LMSize, datamodule: TextDataModule, seed: int, device: torch.device, workload: Workload
) -> Callable[[], None]:
    """TRL's GKD trainer over the first ``steps × batch_size`` training blocks, one epoch a turn."""
    import datasets
    import transformers
    from tokenizers import Tokenizer, models
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    transformers.logging.set_verbosity_error()
    blocks = datamodule.train_set
    if blocks is None:
        raise RuntimeError("set up the text datamodule before building the TRL workload")
    count = size.steps * size.batch_size
    dataset = datasets.Dataset.from_dict(
        {"input_ids": [blocks[i]["input_ids"].tolist() for i in range(count)]}
    )
    # GKDTrainer reads a pad id from its tokenizer; the data are token ids already.
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
        pad_token="<pad>",
    )

    class EpochTimer(transformers.TrainerCallback):
        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            workload.epoch_start()

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            workload.epoch_end()

    student, teacher = _models(size, datamodule.vocab_size, seed)
    output = tempfile.mkdtemp(prefix="kd-bench-trl-")
    args = GKDConfig(
        output_dir=output,
        lmbda=0.0,
        beta=0.0,
        per_device_train_batch_size=size.batch_size,
        num_train_epochs=workload.total_epochs,
        max_steps=workload.total_epochs * size.steps,
        learning_rate=LEARNING_RATE,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        dataloader_drop_last=True,
        seed=seed,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        data_collator=_collate,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[EpochTimer()],
    )
    trainer.remove_callback(transformers.PrinterCallback)  # its end-of-training metrics line

    def train() -> None:
        trainer.train()

    return train


def library_one_teacher(
    size: LMSize, datamodule: TextDataModule, seed: int, device: torch.device, workload: Workload
) -> Callable[[], None]:
    """The same models, data and loss through :class:`~kd_lightning.DistillationModule`."""
    student, teacher = _models(size, datamodule.vocab_size, seed)
    module = DistillationModule(
        HuggingFaceLM(student),
        TeacherEnsemble({"gpt2": HuggingFaceLM(teacher)}),
        DistillationLoss("mean_probs", alpha=1.0, temperature=1.0),
        partial(torch.optim.AdamW, lr=LEARNING_RATE),
    )
    trainer = _trainer(workload, size.steps)
    loader = datamodule.train_dataloader()
    return lambda: trainer.fit(module, train_dataloaders=loader)


def trl_trainers(
    size: LMSize, datamodule: TextDataModule, seed: int, device: torch.device
) -> dict[str, Callable[[Workload], Callable[[], None]]]:
    """``lm_trl`` and ``lm_one_teacher``, for :func:`~kd_lightning.bench.lm.run_round_robin`.

    Raises:
        ImportError: TRL is not installed (``pip install 'kd-lightning[bench]'``).
    """
    try:
        import trl  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "the TRL comparison needs trl: pip install 'kd-lightning[bench]'"
        ) from error
    return {
        "lm_trl": partial(trl_gkd, size, datamodule, seed, device),
        "lm_one_teacher": partial(library_one_teacher, size, datamodule, seed, device),
    }
