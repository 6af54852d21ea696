"""The LoRA training loop of a recovery, on one process: data plan, loss, schedule, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.lora_train import IGNORE, LoraTrainer, Plan, lr_factor, pad_batch, supervised_tokens
from tests.tiny import tiny_model

SETTINGS = dict(r=4, alpha=8.0, dropout=0.1, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"],
                lr=5e-3, weight_decay=0.01, batch_size=4, grad_accum=2, epochs=2, max_steps=None, warmup_steps=2,
                max_grad_norm=1.0, seed=7, log_every=1, checkpoint_every=3)


def examples(count: int = 20, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Sequences of 5..16 tokens whose first 3 are a masked 'prompt'."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(2, 97, size=int(rng.integers(5, 17))) for _ in range(count)]
    labels = [np.concatenate([np.full(3, IGNORE), x[3:]]) for x in ids]
    return ids, labels


def trainer(family: str = "llama", settings: dict | None = None, **kwargs) -> LoraTrainer:
    return LoraTrainer(tiny_model(family), {**SETTINGS, **(settings or {})}, examples(), examples(4, seed=1),
                       pad_id=0, **kwargs)


def adapters(t: LoraTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in zip(t.names, t.params)}


def test_schedule_matches_transformers_linear_warmup():
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=10)
    for step in range(10):
        assert lr_factor(step, 3, 10) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_plan_covers_each_epoch_once_and_is_deterministic():
    plan = Plan(examples=21, batch_size=4, grad_accum=2, epochs=2, max_steps=None, seed=3)
    assert plan.steps_per_epoch == 2 and plan.total_steps == 4  # 5 micro-batches of 4: the 5th is dropped
    first = np.concatenate([np.concatenate(plan.micro_batches(s)) for s in range(2)])
    assert len(set(first.tolist())) == 16  # no example twice within an epoch
    assert [m.tolist() for m in plan.micro_batches(3)] == [m.tolist() for m in plan.micro_batches(3)]
    second = np.concatenate([np.concatenate(plan.micro_batches(s)) for s in range(2, 4)])
    assert first.tolist() != second.tolist()  # the next epoch reshuffles
    with pytest.raises(ValueError, match="do not fill one optimizer step"):
        Plan(examples=7, batch_size=4, grad_accum=2, epochs=1, max_steps=None, seed=0).check()


def test_pad_batch_masks_padding_and_counts_supervised_tokens():
    ids, mask, labels = pad_batch([np.array([5, 6, 7]), np.array([8])], [np.array([IGNORE, 6, 7]), np.array([8])], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert supervised_tokens(np.array([IGNORE, 6, 7])) == 2 and supervised_tokens(np.array([8])) == 0


def test_only_the_adapters_train_and_the_loss_falls(family):
    t = trainer(family, {"dropout": 0.0, "epochs": 6})
    base = {n: p.detach().clone() for n, p in t.peft_model.named_parameters() if not p.requires_grad}
    assert t.names and all("lora_" in n for n in t.names)
    logs = [t.train_step() for _ in range(t.plan.total_steps)]
    assert logs[-1].loss < logs[1].loss  # step 0 runs at lr 0 (warm-up), as transformers.Trainer's first step
    assert logs[-1].tokens == sum(int(np.count_nonzero(np.ones(len(x)))) for m in range(t.plan.total_steps)
                                  for micro in t.plan.micro_batches(m) for x in (t.train_ids[i] for i in micro))
    for n, p in t.peft_model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[n]), n  # the compact model's own weights never move


def test_loss_is_the_token_mean_over_the_global_batch():
    t = trainer(settings={"dropout": 0.0})
    micros = t.plan.micro_batches(0)
    model = t.peft_model
    with torch.no_grad():
        total, count = 0.0, 0
        for i in np.concatenate(micros):
            ids = torch.as_tensor(t.train_ids[i])[None]
            logits = model(input_ids=ids).logits[0, :-1].float()
            labels = torch.as_tensor(t.train_labels[i][1:])
            total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum"))
            count += int((labels != IGNORE).sum())
    assert t.train_step().loss == pytest.approx(total / count, rel=1e-5)


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_weights(tmp_path):
    whole = trainer(settings={"checkpoint_every": 3})
    whole.run()
    first = trainer(settings={"checkpoint_every": 3})
    stopped: list[int] = []

    def stop_at_3(log):
        if log.step == 3:
            first.save(tmp_path / "ckpt", log)
            raise KeyboardInterrupt  # a worker killed right after its checkpoint

    with pytest.raises(KeyboardInterrupt):
        first.run(on_log=lambda log: stopped.append(log.step), on_checkpoint=stop_at_3)
    assert (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").is_file()
    resumed = trainer(settings={"checkpoint_every": 3})
    resumed.load(tmp_path / "ckpt")
    assert resumed.step == 3
    assert [e["step"] for e in resumed.history] == stopped  # the log so far travels with the checkpoint
    resumed.run()
    assert resumed.step == whole.step == whole.plan.total_steps
    assert resumed.tokens == whole.tokens
    assert [(e["step"], e["loss"]) for e in resumed.history] == [(e["step"], e["loss"]) for e in whole.history]
    final, reference = adapters(resumed), adapters(whole)
    for name in reference:  # one CPU process, the same ops in the same order: bitwise
        assert torch.equal(final[name], reference[name]), name


def test_a_checkpoint_of_other_adapters_is_refused(tmp_path):
    t = trainer()
    t.save(tmp_path / "ckpt")
    other = trainer(settings={"targets": ["q_proj", "v_proj"]})
    with pytest.raises(ValueError, match="holds other adapters"):
        other.load(tmp_path / "ckpt")


def test_run_calls_back_on_log_and_checkpoint_steps():
    t = trainer(settings={"log_every": 2, "checkpoint_every": 3})
    logs, checkpoints = [], []
    t.run(on_log=lambda log: logs.append(log.step), on_checkpoint=lambda log: checkpoints.append(log.step))
    total = t.plan.total_steps
    assert checkpoints == sorted({s for s in range(3, total + 1, 3)} | {total})
    assert set(range(2, total + 1, 2)) <= set(logs) and total in logs


# ---- a GPU worker with 2 GPUs: the replica spread by accelerate, in bf16 (device emulation, SPEC 8) -------------
def test_a_worker_trains_a_bf16_replica_spread_over_two_emulated_gpus(tmp_path):
    from actors.export import export_compact
    from actors.lora_worker import place_replica
    from search_spaces import Mask
    from tests.actors.test_devices_paths import emulated_gpus
    from tests.emulation import device_of
    from tests.tiny import save_tiny

    source = save_tiny("llama", tmp_path / "dense")
    compact = export_compact(source, Mask(mlp_removed={1}, attn_removed={2}, mlp_width={3: 24}), tmp_path / "model")
    settings = {**SETTINGS, "dropout": 0.0, "max_steps": 2, "warmup_steps": 0}
    reference = LoraTrainer(place_replica(str(compact), "bfloat16", [torch.device("cpu")], 1), settings, examples(),
                            examples(4, seed=1), pad_id=0)
    expected = [reference.train_step().loss for _ in range(2)]
    with emulated_gpus(2):
        model = place_replica(str(compact), "auto", [torch.device("cuda", 0), torch.device("cuda", 1)], 1)
        layers = model.model.layers
        assert next(model.parameters()).dtype == torch.bfloat16  # auto on a GPU with native bf16
        assert {device_of(layers[0].self_attn.q_proj.weight), device_of(layers[3].mlp.down_proj.weight)} == \
            {"cuda:0", "cuda:1"}  # spread, whole layers
        t = LoraTrainer(model, settings, examples(), examples(4, seed=1), pad_id=0)
        assert {device_of(p) for p in t.params} == {"cuda:0", "cuda:1"}
        assert all(p.dtype == torch.float32 for p in t.params)  # adapters in fp32 over bf16 weights
        logs = []
        t.run(on_log=logs.append)  # 2 steps: clipping and AdamW per device; the last step validates
        losses, val = [log.loss for log in logs], logs[-1].val_loss
        t.save(tmp_path / "ckpt")
        again = LoraTrainer(place_replica(str(compact), "auto", [torch.device("cuda", 0), torch.device("cuda", 1)],
                                          1), settings, examples(), examples(4, seed=1), pad_id=0)
        again.load(tmp_path / "ckpt")
        assert again.step == 2 and all(device_of(p) == device_of(q) for p, q in zip(again.params, t.params))
        assert [e["step"] for e in again.history] == [1, 2] and again.history == t.history  # the log travels
        for p, q in zip(again.params, t.params):
            assert torch.equal(p.detach().cpu(), q.detach().cpu())
    assert losses == pytest.approx(expected, rel=1e-3) and np.isfinite(val)
    for p, q in zip(t.params, reference.params):
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), rtol=1e-3, atol=1e-5)
