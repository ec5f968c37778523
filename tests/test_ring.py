"""Many requests through one ring: every request's logits, loss and memory equal the
request run alone (fp32 <= 1e-5, live memory), whatever the mix of lengths, and requests
may join while others run."""

import pytest
import torch
from conftest import live_model, random_ids, rel
from test_diagonal import assert_same

import diaglab
from diaglab import RingExecutor, schedule


def _alone(model, ids, **kw):
    with torch.no_grad():
        return model(ids[None] if ids.dim() == 1 else ids, **kw)


@pytest.mark.parametrize("lengths,layers,correction", [
    ([5, 21, 8, 40, 13], 3, True),        # shorter than one segment, partial segments, exact multiples
    ([30], 3, True),                      # one request only
    ([9, 3, 17, 8, 1, 24, 11], 2, True),  # more requests than layers
    ([20, 7, 16], 3, False),              # correction off
])
def test_each_request_equals_running_it_alone(lengths, layers, correction):
    model = live_model(layers=layers, correction=correction)    # segment 8
    reqs = [random_ids(1, N, seed=i) for i, N in enumerate(lengths)]
    labels = [r.clone() for r in reqs]
    runner = RingExecutor(model)
    with torch.no_grad():
        outs = runner.run(reqs, labels=labels)
    for ids, lab, out in zip(reqs, labels, outs):
        assert out.logits.shape == (1, ids.shape[1], 256)
        alone = _alone(model, ids, labels=lab)
        if ids.shape[1] == 1:                      # one token: no next-token target, the mean is nan in both
            assert alone.loss.isnan() and out.loss.isnan()
            alone.loss = out.loss = None
        assert_same(alone, out, 1e-5)
    S = [-(-N // 8) for N in lengths]
    assert runner.step_count == sum(S) + layers - 1              # the ramps, paid once
    steps = [[(l, r, s) for l, r, s in step] for step in runner.history]
    schedule.validate_ring(steps, layers, S)
    assert steps == schedule.ring(layers, S)


def test_requests_in_one_dimension_and_bf16():
    model = live_model(layers=2).to(torch.bfloat16)
    reqs = [random_ids(1, 19, seed=1)[0], random_ids(1, 33, seed=2)[0]]     # [N] each
    with torch.no_grad():
        outs = RingExecutor(model).run(reqs)
    for ids, out in zip(reqs, outs):
        assert rel(out.logits, _alone(model, ids).logits) <= 2e-2


def test_a_request_joins_while_others_run():
    model = live_model(layers=3)
    runner = RingExecutor(model)
    a, b, c = random_ids(1, 40, seed=1), random_ids(1, 12, seed=2), random_ids(1, 27, seed=3)
    done = {}
    with torch.no_grad():
        ra = runner.submit(a)
        for _ in range(2):
            done.update(runner.step())
        rb = runner.submit(b)                       # joins after 2 steps, while a is in flight
        while runner.pending:
            done.update(runner.step())
            if runner.step_count == 9:
                rc = runner.submit(c)               # joins later still
    assert set(done) == {ra, rb, rc}
    for rid, ids in ((ra, a), (rb, b), (rc, c)):
        assert_same(_alone(model, ids), done[rid], 1e-5)
    assert all(len({l for l, _, _ in step}) == len(step) for step in runner.history)   # one cell per slot


def test_empty_slots_are_not_computed():
    """A queue that runs dry and refills: the gap's slots are skipped (history has no cell
    there) and the grouped calls cover only busy slots."""
    model = live_model(layers=4)
    runner = RingExecutor(model)
    with torch.no_grad():
        runner.submit(random_ids(1, 8))             # 1 segment
        runner.step(), runner.step()                # the queue is empty now: slot 0 idles
        runner.submit(random_ids(1, 16, seed=1))
        calls = []
        import diaglab.ring as ring
        real = ring.RingExecutor._run

        def spy(self, cells, *a):
            calls.append([l for l, _, _ in cells])
            return real(self, cells, *a)
        ring.RingExecutor._run = spy
        try:
            runner.step()
        finally:
            ring.RingExecutor._run = real
    assert calls == [[0], [2]]                      # slot 1 is empty: two calls, nothing on zeros


def test_bad_requests_are_refused(model):
    runner = RingExecutor(model)
    with pytest.raises(ValueError, match="empty input"):
        runner.submit(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[1, N\] or \[N\]"):
        runner.submit(random_ids(2, 10))
    with pytest.raises(ValueError, match="attention_mask shape"):
        runner.submit(random_ids(1, 10), attention_mask=torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty list"):
        runner.run([])
    runner.submit(random_ids(1, 10))
    with pytest.raises(RuntimeError, match="still running"):
        runner.run([random_ids(1, 10)])


def test_memory_resets_when_a_new_request_reaches_a_layer():
    """Two identical requests back to back give the same outputs (up to the rounding of
    differently sized groups): nothing of the first leaks into the second through the
    shared layer slots — a leak would move the second by the memory's whole effect."""
    model = live_model(layers=3)
    ids = random_ids(1, 30)
    with torch.no_grad():
        first, second = RingExecutor(model).run([ids, ids.clone()])
        leaked = model(ids, state=model(ids[:, :24]).state)   # what carrying the memory over looks like
    assert rel(second.logits, first.logits) <= 1e-6 and rel(second.state.W_mem, first.state.W_mem) <= 1e-6
    assert rel(leaked.logits, first.logits) > 1e-3
    assert diaglab.MemoryState is type(first.state)


def test_queue_bench_rows_and_cli(tmp_path, capsys):
    from diaglab import bench
    model = live_model(layers=2)
    reqs = bench.queue_requests(model, requests=3, segments=(1, 3), seed=4)
    assert [r.shape[0] for r in reqs] == [1, 1, 1] and all(1 <= r.shape[1] <= 24 for r in reqs)
    assert [torch.equal(a, b) for a, b in zip(reqs, bench.queue_requests(model, 3, (1, 3), seed=4))] == [True] * 3
    rows = bench.run_queue_bench(model, reqs, warmup=0, repeats=1)
    by = {r["mode"]: r for r in rows}
    assert set(by) == set(bench.QUEUE_MODES)
    S = by["ring"]["request_segments"]
    assert by["ring"]["steps"] == sum(S) + 1 and by["back_to_back"]["steps"] == sum(s + 1 for s in S)
    assert all(len(r["latency_ms"]) == 3 and r["seconds"] > 0 for r in rows)
    assert all(r["machine"]["malloc"] and r["hidden"] == model.hidden_size for r in rows)   # what it ran on
    assert by["batched"]["latency_ms"] == [by["batched"]["latency_ms"][0]] * 3      # one batch: all at the end
    lat = by["back_to_back"]["latency_ms"]
    assert lat == sorted(lat)                                                         # one after another
    out = tmp_path / "q.json"
    bench.main(["--queue", "2", "--queue-segments", "1,2", "--layers", "2", "--warmup", "0", "--repeats", "1",
                "--no-progress", "--json", str(out)])
    assert "x / ring" in capsys.readouterr().out and len(__import__("json").loads(out.read_text())) == 4
    for bad in (["--queue", "2", "--segments", "4"], ["--queue", "0"], ["--queue", "2", "--queue-segments", "5,2"]):
        with pytest.raises(SystemExit) as e:
            bench.main(bad)
        assert e.value.code == 2


def test_ring_step_records_and_figure():
    from diaglab import profiling, viz
    model = live_model(layers=3)
    reqs = [random_ids(1, 20, seed=1), random_ids(1, 9, seed=2)]
    outs, records = profiling.profile_ring(RingExecutor(model), reqs)
    assert [r.step for r in records] == list(range(3 + 2 + 3 - 1))
    assert records[0].cells == ((0, 0, 0),) and records[0].resets == (0,)
    assert records[3].cells[0] == (0, 1, 0) and 0 in records[3].resets          # request 1 starts: slot 0 resets
    assert {rid for r in records for rid in r.finished} == {0, 1} and all(r.ms > 0 for r in records)
    with torch.no_grad():
        assert rel(outs[1].logits, model(reqs[1]).logits) <= 1e-5
    fig = viz.ring_figure(3, steps=[list(r.cells) for r in records])
    assert "⟲" in "".join(str(t) for row in fig.data[0].text for t in row)
    assert len(viz.ring_animation(3, steps=[list(r.cells) for r in records]).frames) == len(records)


# ---- generation after a shared prefill --------------------------------------------------
def test_generate_equals_model_generate_per_request():
    """Prompts of mixed lengths (shorter than a segment, partial, an exact multiple), greedy,
    past a segment boundary (so a commit with its write happens while decoding): the tokens
    of each request equal model.generate on it alone, and the prefill ran as one ring."""
    model = live_model(layers=3)                                  # segment 8
    prompts = [random_ids(1, N, seed=10 + i) for i, N in enumerate([5, 21, 16, 11])]
    runner = RingExecutor(model)
    outs = runner.generate(prompts, max_new_tokens=12)
    for ids, out in zip(prompts, outs):
        assert out.shape == (1, ids.shape[1] + 12)
        assert torch.equal(out, model.generate(ids, max_new_tokens=12))
    assert runner.step_count == (2 + 2 + 1) + 3 - 1               # full segments of 21, 16, 11; once
    assert runner.pending == 0
    assert torch.equal(runner.generate([prompts[0][0]], max_new_tokens=0)[0], prompts[0])   # [N], no tokens


def test_generate_refuses_bad_input():
    model = live_model(layers=2)
    runner = RingExecutor(model)
    with pytest.raises(ValueError, match="non-empty list"):
        runner.generate([])
    with pytest.raises(ValueError, match=r"prompt 1 must be \[1, N\]"):
        runner.generate([random_ids(1, 5), random_ids(2, 5)])
    with pytest.raises(ValueError, match="temperature"):
        runner.generate([random_ids(1, 5)], do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="vocab"):
        runner.generate([torch.full((1, 4), 10_000)])
    runner.submit(random_ids(1, 9))
    with pytest.raises(RuntimeError, match="still running"):
        runner.generate([random_ids(1, 5)])


def test_ring_under_autograd_backpropagates():
    """With gradients on (the step's outputs are saved for backward, and nothing is changed in
    place), the numbers and the gradients equal running each request alone."""
    model = live_model(layers=3)
    reqs = [random_ids(1, N, seed=20 + i) for i, N in enumerate([19, 8, 30])]
    outs = RingExecutor(model).run(reqs, labels=reqs)
    sum(o.loss for o in outs).backward()
    ring_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = [model(ids, labels=ids) for ids in reqs]
    sum(o.loss for o in alone).backward()
    for a, o in zip(alone, outs):
        assert_same(a, o, 1e-5)
    assert ring_grads.keys() == {k for k, p in model.named_parameters() if p.grad is not None}
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert rel(ring_grads[k], p.grad) <= 1e-5, k


def test_a_failed_step_empties_the_ring_with_a_clear_error():
    """An exception inside a step (here a hook that raises once) is reported with the requests
    it dropped; the ring is empty afterwards, and the same runner then serves them exactly."""
    model = live_model(layers=4)
    runner = RingExecutor(model)
    reqs = [random_ids(1, N, seed=N) for N in (40, 24, 16)]
    calls = {"n": 0}

    def boom(module, args, out):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
    hook = model.base.model.layers[2].register_forward_hook(boom)
    with torch.no_grad(), pytest.warns(UserWarning):
        for ids in reqs:
            runner.submit(ids)
        with pytest.raises(RuntimeError, match=r"a step failed \(RuntimeError: boom\).*\[0, 1, 2\] were dropped"):
            for _ in range(20):
                runner.step()
    hook.remove()
    assert runner.pending == 0
    with torch.no_grad():
        for ids, out in zip(reqs, runner.run(reqs)):
            assert_same(_alone(model, ids), out, 1e-5)


def test_a_drained_ring_meets_a_new_dtype_and_grad_mode():
    model = live_model(layers=3)
    runner = RingExecutor(model)
    reqs = [random_ids(1, 37, seed=1), random_ids(1, 9, seed=2)]
    with torch.inference_mode():
        runner.run(reqs)                                  # slots emptied in place under inference mode
    outs = runner.run(reqs, labels=reqs)                  # then with gradients: no inference tensors left
    sum(o.loss for o in outs).backward()
    model.zero_grad()
    model.to(torch.bfloat16)
    with torch.no_grad():
        for ids, out in zip(reqs, runner.run(reqs)):
            assert out.logits.dtype == torch.bfloat16
            assert rel(out.logits, _alone(model, ids).logits) <= 2e-2


def test_run_queues_nothing_when_one_request_is_bad():
    model = live_model(layers=2)
    runner = RingExecutor(model)
    with pytest.raises(ValueError, match=r"input_ids must be \[1, N\]"):
        runner.run([random_ids(1, 9), random_ids(2, 9)])
    assert runner.pending == 0
    with torch.no_grad():
        assert_same(_alone(model, random_ids(1, 9)), runner.run([random_ids(1, 9)])[0], 1e-5)


def test_padded_requests_keep_their_first_segment_masks():
    """Requests whose row ends inside a segment — inside its first one, so it never writes and
    its later (all-padding) segments meet a slot still on its first segment — each equal
    themselves run alone with their mask, also behind a full request."""
    model = live_model(layers=3)                                 # segment 8
    reqs = [random_ids(1, 24, seed=1), random_ids(1, 24, seed=2), random_ids(1, 40, seed=3)]
    masks = [torch.ones(1, 24, dtype=torch.long), torch.ones(1, 24, dtype=torch.long),
             torch.ones(1, 40, dtype=torch.long)]
    masks[1][0, 5:] = 0                                          # ends inside segment 0: no write, ever
    masks[2][0, 19:] = 0                                         # ends inside segment 2
    with torch.no_grad():
        outs = RingExecutor(model).run(reqs, attention_masks=masks)
    for ids, m, out in zip(reqs, masks, outs):
        assert_same(_alone(model, ids, attention_mask=m), out, 1e-5, real=m.bool())


def test_no_grad_queue_returns_ordinary_tensors_and_stays_in_its_mode():
    """Under no_grad the ring's steps run in inference mode; its outputs are ordinary tensors
    (a later call under autograd can continue from a request's memory), and a queue started
    under no_grad refuses to continue under autograd, losing nothing."""
    model = live_model(layers=3)
    runner = RingExecutor(model)
    a, b = random_ids(1, 32, seed=1), random_ids(1, 24, seed=2)
    with torch.no_grad():
        out = runner.run([a])[0]
    assert not any(t.is_inference() for t in (out.logits, out.state.W_mem, out.state.z, out.state.is_first))
    model(b, labels=b, state=out.state).loss.backward()            # continues under autograd
    with torch.no_grad():
        rid = runner.submit(a)
        runner.step()
    with pytest.raises(RuntimeError, match="started under torch.no_grad"):
        runner.step()
    assert runner.pending == 1
    with torch.no_grad():
        while runner.pending:
            done = runner.step()
    assert_same(_alone(model, a), done[rid], 1e-5)


def test_a_queue_keeps_the_grad_mode_it_started_in():
    """A queue started under autograd runs every step outside inference mode, also a step taken
    under no_grad in between (its tensors meet later autograd steps): no crash, every request
    equals itself alone, and the summed loss backpropagates."""
    model = live_model(layers=3)
    reqs = [random_ids(1, N, seed=i) for i, N in enumerate([16, 8, 24, 9])]
    for when in (1, 4):
        runner = RingExecutor(model)
        rids = [runner.submit(r, labels=r) for r in reqs]
        done, t = {}, 0
        while runner.pending:
            with torch.no_grad() if t == when else torch.enable_grad():
                done.update(runner.step())
            t += 1
        sum(done[r].loss for r in rids).backward()
        model.zero_grad()
        for rid, ids in zip(rids, reqs):
            assert_same(_alone(model, ids, labels=ids), done[rid], 1e-5)


def test_segments_fed_after_a_model_change_use_the_new_weights():
    """The ring embeds a segment when it is fed: with one layer a step is one segment, so changing
    the embedding or the memory tokens between steps must act like two calls of the model."""
    for change in (lambda m: m.base.model.embed_tokens.weight.mul_(1.5), lambda m: m.memory.mul_(1.5)):
        model, twin = live_model(layers=1), live_model(layers=1)
        ids = random_ids(1, 40, seed=1)                           # 5 segments of 8
        runner = RingExecutor(model)
        with torch.no_grad():
            rid = runner.submit(ids)
            done = runner.step()                                  # segment 0, old weights
            change(model)
            while runner.pending:
                done.update(runner.step())
            first = twin(ids[:, :8])
            change(twin)
            rest = twin(ids[:, 8:], state=first.state)
        assert rel(done[rid].logits, torch.cat([first.logits, rest.logits], 1)) <= 1e-5
        assert rel(done[rid].state.W_mem, rest.state.W_mem) <= 1e-5


def test_hooks_in_a_no_grad_queue_see_ordinary_tensors():
    """With a hook the ring runs the model's own modules; those steps run outside inference mode,
    so what a hook keeps can be used under autograd later, as with model(ids)."""
    model = live_model(layers=2)
    kept = []
    model.base.model.layers[1].register_forward_hook(lambda m, i, o: kept.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad(), pytest.warns(UserWarning, match="grouped_layer_ref"):
        RingExecutor(model).run([random_ids(1, 20, seed=3), random_ids(1, 12, seed=4)])
    assert kept and not any(t.is_inference() for t in kept)
    probe = torch.randn(kept[0].shape[-1], requires_grad=True)
    (kept[0] @ probe).sum().backward()
    assert probe.grad is not None
