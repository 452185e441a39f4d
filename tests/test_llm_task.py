"""The causal-LM task driven the way the training loop drives it (micro-batches, loss,
accumulation, adapter state, held-out loss, samples) on a tiny Llama."""

from __future__ import annotations

import json

import pytest
from llm_fixtures import pirate_records, tiny_llama, write_jsonl  # noqa: F401 (fixture)

from loracli.llm import task as llm_task

pytestmark = pytest.mark.slow


def make(tmp_path, folder, **kw):
    data = write_jsonl(tmp_path / "data" / "pirate.jsonl", pirate_records(24))
    kw.setdefault("dropout", 0.0)
    settings = llm_task.Settings(base=str(folder), data_dir=str(data), **kw)
    return llm_task.CausalLMTask(tmp_path / "run", settings)


def step_grads(task, step=0):
    """One optimizer step's gradients, accumulated as the training loop does."""
    import torch

    accum = task.s.accumulation
    for a in range(accum):
        (task.loss(task.micro_batch(step * accum + a)) / accum).backward()
    return {n: p.grad.clone() for n, p in task.model.named_parameters() if p.requires_grad}


def test_micro_batches_are_a_pure_function_of_seed_and_index(tmp_path, tiny_llama):
    import torch

    a = make(tmp_path / "a", tiny_llama, batch_size=3, seed=9)
    b = make(tmp_path / "b", tiny_llama, batch_size=3, seed=9)
    c = make(tmp_path / "c", tiny_llama, batch_size=3, seed=10)
    for i in (0, 5, 8, 11):  # 8 per epoch: 11 is in the second epoch
        assert torch.equal(a.micro_batch(i)["input_ids"], b.micro_batch(i)["input_ids"])
    assert [a.plan.units_of(m) for m in range(8)] != [c.plan.units_of(m) for m in range(8)]
    assert a.batches_per_epoch == 8
    seen = sorted(i for m in range(8) for u in a.plan.units_of(m) for i in u)
    assert seen == list(range(24))
    assert (tmp_path / "a" / "run" / "chat_template.jinja").read_text() == a.tokenizer.chat_template


def test_accumulated_step_equals_one_big_batch(tmp_path, tiny_llama):
    import torch

    accumulated = make(tmp_path / "a", tiny_llama, batch_size=2, accumulation=2)
    # the same four examples as one batch: the plan's order for batch 4 differs, so build the
    # big batch from the micro-batches the accumulated step used
    big = make(tmp_path / "b", tiny_llama, batch_size=4)
    units = accumulated.plan.units_of(0) + accumulated.plan.units_of(1)
    big.plan.units_of = lambda micro: units
    g1, g2 = step_grads(accumulated), step_grads(big)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-7, rtol=1e-4)


def test_training_learns_the_answers_and_state_round_trips(tmp_path, tiny_llama):
    import torch

    t = make(tmp_path, tiny_llama, batch_size=4, eval_split=0.25, learning_rate=1e-2, rank=8,
             prompts=("Who are you?",), max_new_tokens=8)
    before = t.evaluate()
    assert before["eval_loss"] == pytest.approx(before["base_eval_loss"])  # B starts at zero
    opt = torch.optim.AdamW(t.param_groups())
    assert opt.param_groups[0]["lr"] == 1e-2
    for step in range(40):
        step_grads(t, step)
        opt.step()
        opt.zero_grad()
    after = t.evaluate()
    # a random tiny base spreads its probability thinly: a drop of 0.5 nats is a clear signal
    assert after["eval_loss"] < before["eval_loss"] - 0.5
    assert after["perplexity"] < before["perplexity"]
    assert after["base_eval_loss"] == pytest.approx(before["base_eval_loss"])
    (path,) = t.samples(40)
    line = json.loads(path.read_text().splitlines()[0])
    assert line["prompt"] == "Who are you?" and line["answer"].startswith("Arr")

    state = t.adapter_state()["model"]
    fresh = make(tmp_path / "fresh", tiny_llama, batch_size=4, eval_split=0.25)
    fresh.load_adapter_state({"model": state[0]})
    assert fresh.evaluate()["eval_loss"] == pytest.approx(after["eval_loss"], rel=1e-6)


def test_stopping_and_resuming_gives_the_same_adapter_bit_for_bit(tmp_path, tiny_llama):
    """With LoRA dropout on and accumulation: 4 steps straight = 2 steps, a fresh process-like
    restart from the saved adapter/optimizer, 2 more (the loop's own reseeding per micro-batch)."""
    import torch

    from loracli.training.denoiser import seed_from

    def train(t, opt, steps):
        t.model.train()
        for step in steps:
            for a in range(2):
                micro = step * 2 + a
                torch.manual_seed(seed_from(42, micro, 0, 2))
                (t.loss(t.micro_batch(micro)) / 2).backward()
            opt.step()
            opt.zero_grad()

    kw = dict(batch_size=2, accumulation=2, learning_rate=1e-2, packing=True, max_length=64,
              dropout=0.1)
    straight = make(tmp_path / "a", tiny_llama, **kw)
    opt = torch.optim.AdamW(straight.param_groups())
    train(straight, opt, range(4))

    first = make(tmp_path / "b", tiny_llama, **kw)
    opt1 = torch.optim.AdamW(first.param_groups())
    train(first, opt1, range(2))
    adapter, saved_opt = first.adapter_state()["model"][0], opt1.state_dict()
    second = make(tmp_path / "b", tiny_llama, **kw)
    second.load_adapter_state({"model": {k: v.clone() for k, v in adapter.items()}})
    opt2 = torch.optim.AdamW(second.param_groups())
    opt2.load_state_dict(saved_opt)
    train(second, opt2, range(2, 4))

    a, b = straight.adapter_state()["model"][0], second.adapter_state()["model"][0]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[next(iter(a))], adapter[next(iter(a))])  # it did train on
