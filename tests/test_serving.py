"""Serving a library: a bounded resident set (LRU, pins, chunks), stacks updated a slot at
a time, and per-call state that keeps threads and nested calls apart."""

import copy
import threading

import pytest
import torch
from helpers import VIT_TARGETS, Tiny, gaussian, randomise, tiny_vit, unit

import skillbank as sb
from skillbank.adapters.stacks import StackPool

pytestmark = pytest.mark.usefixtures("one_thread")

N_SKILLS = 6


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture
def bank(tmp_path, model):
    """Skills s0..s5 on Tiny's patch_embed: random factors and heads, examples around e_i."""
    with sb.SkillBank.open(tmp_path / "bank") as b:
        for i in range(N_SKILLS):
            m = copy.deepcopy(model)
            name = f"s{i}"
            sb.add_adapter(m, name, sb.LoRAConfig(rank=2, targets=["patch_embed"], head="head"))
            randomise(m, name, std=0.5)
            with torch.no_grad():
                m.head.weight.add_(torch.randn(m.head.weight.shape) * 0.5)
            x = gaussian(unit(i, 3), 0.3, 20, i)
            emb = sb.example_embedding(model, x, head="head")
            b.add(name, sb.Skill.from_model(m, name), embedding=emb, embed_text=False)
        yield b


def ref(i: int) -> str:
    return f"s{i}@1"


def serve(model, bank, **kw) -> sb.Router:
    return sb.Router(model, bank, head="head", mask_classes=False, **kw)


def batch(i: int, n: int = 8) -> torch.Tensor:
    return gaussian(unit(i % N_SKILLS, 3), 0.3, n, 100 + i)


def test_resident_set_stays_under_the_cap_and_outputs_match_unlimited(model, bank):
    small = serve(model, bank, max_resident=2)
    free = serve(copy.deepcopy(model), bank, max_resident=100)
    x = torch.randn(6, 8)
    for picks in ([0, 1], [2, 2], [3, 0], [1, 4], [5, 5], [0, 1]):
        refs = [ref(picks[i % 2]) for i in range(6)]
        torch.testing.assert_close(small.forward(x, refs), free.forward(x, refs), rtol=0, atol=0)
        assert len(sb.adapter_names(model)) <= 2
    # a batch needing more skills than fit runs in groups, rows back in place
    refs = [ref(i % 5) for i in range(10)]
    x = torch.randn(10, 8)
    torch.testing.assert_close(small.forward(x, refs), free.forward(x, refs))
    assert len(sb.adapter_names(model)) <= 2
    st = small.stats
    assert st.max_resident == 2 and st.resident <= 2 and st.chunks == 2
    assert st.misses > N_SKILLS and st.evictions == st.misses - st.resident
    # load_seconds: that the loads' time is recorded at all (a record check, not a speed claim)
    assert st.hits > 0 and 0 < st.hit_rate < 1 and st.load_seconds > 0
    assert free.stats.evictions == 0 and free.stats.misses == N_SKILLS


def test_least_recently_used_unpinned_skill_leaves_first(model, bank):
    router = serve(model, bank, max_resident=3, pin=["s0"])
    assert router.resident.resident() == [ref(0)]  # pins load at once
    x = torch.randn(2, 8)
    for i in (1, 2, 1):  # s1 used again after s2: s2 is now the least recently used
        router.forward(x, [ref(i)] * 2)
    router.forward(x, [ref(3)] * 2)
    assert set(router.resident.resident()) == {ref(0), ref(1), ref(3)}
    router.forward(x, [ref(4), ref(0)])  # s0 is pinned: s1 goes, though older uses of s0
    assert set(router.resident.resident()) == {ref(0), ref(3), ref(4)}
    assert sorted(sb.adapter_names(model)) == ["s0-v1", "s3-v1", "s4-v1"]
    st = router.stats
    assert (st.misses, st.hits, st.evictions, st.pinned) == (4, 2, 2, 1)  # pins preload: no miss


def test_a_full_cap_of_pins_refuses_other_skills(model, bank):
    router = serve(model, bank, max_resident=2, pin=["s0", "s1"])
    router.forward(torch.randn(2, 8), [ref(0), ref(1)])
    with pytest.raises(sb.ConfigError, match="pinned"):
        router.forward(torch.randn(2, 8), [ref(2), ref(0)])
    assert sorted(sb.adapter_names(model)) == ["s0-v1", "s1-v1"]


@pytest.mark.parametrize(
    "kw, error",
    [
        ({"max_resident": 0}, sb.ConfigError),
        ({"max_resident": -3}, sb.ConfigError),
        ({"max_resident": 2.5}, sb.ConfigError),
        ({"max_resident": True}, sb.ConfigError),
        ({"pin": ["nope"]}, sb.SkillNotFound),
        ({"pin": "s0"}, sb.ConfigError),
        ({"max_resident": 2, "pin": ["s0", "s1", "s2"]}, sb.ConfigError),
    ],
)
def test_bad_serving_settings_are_refused_and_change_nothing(model, bank, kw, error):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error):
        serve(model, bank, **kw)
    assert sb.adapter_names(model) == []
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_skill_removed_from_the_bank_leaves_the_model(model, bank):
    router = serve(model, bank, max_resident=4)
    x = torch.randn(2, 8)
    router.forward(x, [ref(1), ref(2)])
    bank.remove(ref(1))
    router.forward(x, [ref(2)] * 2)
    assert sb.adapter_names(model) == ["s2-v1"]
    with pytest.raises(sb.SkillNotFound):
        router.forward(x, [ref(1)] * 2)


def test_the_default_cap_follows_the_model_size(model, bank):
    skill = bank.get("s0")
    assert sb.default_max_resident(model, skill) == 8  # a tiny model: the floor
    big = torch.nn.Sequential(torch.nn.Linear(1000, 1000))
    assert sb.default_max_resident(big, skill) == 256  # the ceiling
    router = serve(model, bank)
    assert router.stats.max_resident == 0  # fixed by the first skill loaded
    router.forward(torch.randn(2, 8), [ref(0)] * 2)
    assert router.stats.max_resident == 8


def test_threads_routing_through_one_model_give_the_serial_outputs(model, bank):
    batches = [batch(i, 12) for i in range(8)]
    serial = serve(copy.deepcopy(model), bank, max_resident=100)
    want = [serial(x) for x in batches]
    assert len({r for w in want for r in w.refs}) >= 4
    router = serve(model, bank, max_resident=3)  # evictions while other threads run
    got: dict[int, list] = {}
    start = threading.Barrier(4)
    errors = []

    def work(t: int) -> None:
        try:
            start.wait()
            for _ in range(6):
                for j in range(t, len(batches), 4):
                    got.setdefault(j, []).append(router(batches[j]))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for j, w in enumerate(want):
        for routed in got[j]:
            assert routed.refs == w.refs
            torch.testing.assert_close(routed.logits, w.logits, rtol=0, atol=0)
    assert router.stats.resident <= 3


def _vit_with(names, rank=4):
    vit = tiny_vit()
    for i, n in enumerate(names):
        sb.add_adapter(
            vit, n, sb.LoRAConfig(rank=rank + i % 2, targets=VIT_TARGETS), activate=False
        )
        randomise(vit, n)
    return vit


def test_threads_running_mixed_batches_give_the_serial_outputs(x28):
    names = ["a", "b", "c", "d"]
    vit = _vit_with(names)
    x = x28[:4].repeat(2, 1, 1, 1)
    plans = [[names[(i + t) % 4] if (i + t) % 3 else None for i in range(8)] for t in range(4)]
    with torch.no_grad():
        want = []
        for rows in plans:
            with sb.mixed_batch(vit, rows):
                want.append(vit(x))
    out: dict[int, list[torch.Tensor]] = {t: [] for t in range(4)}
    start = threading.Barrier(4)

    def work(t: int) -> None:
        start.wait()
        with torch.no_grad():
            for _ in range(5):
                with sb.mixed_batch(vit, plans[t]):
                    out[t].append(vit(x))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in range(4):
        assert len(out[t]) == 5
        for y in out[t]:
            torch.testing.assert_close(y, want[t], rtol=0, atol=0)


def test_nested_calls_see_their_own_rows_and_the_outer_ones_return(x28):
    vit = _vit_with(["a", "b"])
    x = x28[:4]
    outer_rows, inner_rows = ["a", "b", None, "a"], ["b", None, "a", "a"]
    w = torch.tensor([[0.3, 0.7]] * 4)
    with torch.no_grad():
        with sb.mixed_batch(vit, outer_rows):
            outer = vit(x)
        with sb.mixed_batch(vit, inner_rows):
            inner = vit(x)
        with sb.composed(vit, ["a", "b"], w):
            mix = vit(x)
        bare = vit(x)
        with sb.mixed_batch(vit, outer_rows):
            with sb.mixed_batch(vit, inner_rows):
                torch.testing.assert_close(vit(x), inner, rtol=0, atol=0)
            torch.testing.assert_close(vit(x), outer, rtol=0, atol=0)
            with sb.composed(vit, ["a", "b"], w):
                torch.testing.assert_close(vit(x), mix, rtol=0, atol=0)
                with sb.disabled(vit):
                    torch.testing.assert_close(vit(x), bare, rtol=0, atol=0)
                torch.testing.assert_close(vit(x), mix, rtol=0, atol=0)
            torch.testing.assert_close(vit(x), outer, rtol=0, atol=0)
        torch.testing.assert_close(vit(x), bare, rtol=0, atol=0)
    assert all(layer.call is None for layer in sb.adapter_layers(vit))


def test_stacks_are_written_a_slot_at_a_time_and_stay_bounded(x28, monkeypatch):
    names = [f"n{i}" for i in range(6)]
    vit = _vit_with(names)
    writes = []
    write = StackPool._write
    monkeypatch.setattr(
        StackPool, "_write", lambda self, slot, *a: (writes.append(slot), write(self, slot, *a))
    )
    layers = sb.adapter_layers(vit)
    x = x28[:6]

    def run(rows):
        writes.clear()
        with torch.no_grad(), sb.mixed_batch(vit, rows):
            return vit(x)

    run(names[:4] + [None, None])
    assert len(writes) == 4 * len(layers)
    run(names[:4][::-1] + [None, "n0"])
    assert writes == []  # the same adapters in another order: nothing rebuilt
    run(names[:4] + ["n4", None])
    assert len(writes) == len(layers)  # one new adapter: one slot per layer
    sb.remove_adapter(vit, "n4")
    sb.remove_adapter(vit, "n1")
    cap = layers[0]._pool.capacity
    for _ in range(3):  # freed slots are reused: the stacks do not grow
        y = run(["n5", "n0", "n2", "n3", None, "n5"])
    assert layers[0]._pool.capacity == cap
    # the pooled stacks give what stacks built for the call give
    vit2 = copy.deepcopy(vit)  # a copy starts with empty pools
    assert layers[0]._pool.capacity and sb.adapter_layers(vit2)[0]._pool.capacity == 0
    with torch.no_grad(), sb.mixed_batch(vit2, ["n5", "n0", "n2", "n3", None, "n5"]):
        torch.testing.assert_close(vit2(x), y, rtol=0, atol=0)


def test_a_factor_changed_inside_the_block_is_seen(x28):
    vit = _vit_with(["a", "b"])
    x = x28[:2]
    layer = sb.adapter_layers(vit)[0]
    with torch.no_grad(), sb.mixed_batch(vit, ["a", "b"]):
        before = vit(x)
        layer.set_adapter_scale("a", 3 * layer.adapter_scale("a"))
        after = vit(x)
    assert not torch.allclose(before[0], after[0]) and torch.equal(before[1], after[1])


def test_the_callers_adapters_are_never_counted_or_evicted(model, bank):
    skill = bank.get(ref(0))
    sb.attach(model, skill, "mine", load_head=False, activate=False)
    router = serve(model, bank)  # the default cap is fixed only once a bank skill loads
    router.register(ref(0), "mine", skill)
    x = torch.randn(2, 8)
    router.forward(x, [ref(0)] * 2)
    assert router.stats.resident == 0 and router.stats.max_resident == 0
    small = serve(model, bank, max_resident=1)
    small.register(ref(0), "mine", skill)
    for i in (1, 2, 3):
        small.forward(x, [ref(0), ref(i)])
    assert sorted(sb.adapter_names(model)) == ["mine", "s3-v1"]
