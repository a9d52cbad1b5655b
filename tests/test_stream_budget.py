import torch

from legonet.format import deserialize
from legonet.stream_budget import entry_bytes, restore, snapshot, spend_savings, spend_slack, undo_growth
from legonet.target import compress_to_ratio


def sparse_state_dict(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}.weight": torch.randn(64, 48, generator=g) * (torch.rand(64, 48, generator=g) < 0.3)
            for i in range(n)}


def test_undo_growth_gives_back_only_what_grew_until_the_budget_holds():
    sd = sparse_state_dict()
    cm, _ = compress_to_ratio(sd, 6.0)
    assert cm.config.entropy_coding
    state = snapshot(cm)
    budget = sum(state["bytes"].values())
    assert undo_growth(cm, budget, state) == []  # nothing grew
    a, b = cm.tensors["l0.weight"], cm.tensors["l1.weight"]
    k = cm.codebooks[a.codebook].shape[0]
    a.indices = torch.arange(a.indices.numel()) % k  # spread: its stream grows
    b.indices = torch.zeros_like(b.indices)  # one centroid: its stream shrinks
    cm.codebooks[a.codebook] = cm.codebooks[a.codebook] + 1.0
    assert sum(entry_bytes(cm).values()) > budget
    assert undo_growth(cm, budget, state) == ["l0.weight"]
    assert torch.equal(cm.tensors["l0.weight"].indices, state["tensors"]["l0.weight"].indices)
    assert torch.equal(cm.codebooks[a.codebook], state["codebooks"][a.codebook])
    assert not cm.tensors["l1.weight"].indices.any()
    assert sum(entry_bytes(cm).values()) <= budget


def test_spend_savings_upgrades_within_the_budget_and_refits_what_it_changed():
    sd = sparse_state_dict(seed=1)
    tables = {}
    cm, plan = compress_to_ratio(sd, 8.0, tables_out=tables)
    assert set(tables) == set(plan) and all(plan[n] in tables[n] for n in plan)
    budget = sum(entry_bytes(cm).values())
    # a step that leaves one tensor's stream far smaller than planned (as the layer fit's reassignment does)
    cm.tensors["l2.weight"].indices = torch.zeros_like(cm.tensors["l2.weight"].indices)
    shrunk = sum(entry_bytes(cm).values())
    refitted = []
    kept = spend_savings(cm, sd, tables, plan, budget, refit=refitted.extend)
    assert kept and set(kept) <= set(refitted)
    assert shrunk < sum(entry_bytes(cm).values()) <= budget  # the savings spent, within the budget
    back = deserialize(cm.to_bytes())  # stored as the writer stores them (8-bit codes where planned)
    for n in kept:
        assert torch.equal(back.reconstruct(n), cm.reconstruct(n))


def test_spend_savings_does_nothing_without_savings():
    sd = sparse_state_dict(seed=2)
    tables = {}
    cm, plan = compress_to_ratio(sd, 8.0, tables_out=tables)
    budget = sum(entry_bytes(cm).values())
    before = cm.to_bytes()
    assert spend_savings(cm, sd, tables, plan, budget, refit=lambda names: None) == {}
    assert cm.to_bytes() == before


def _weight_error(cm, sd) -> float:
    return sum(float((cm.reconstruct(n).float() - sd[n]).pow(2).sum() / sd[n].pow(2).sum()) for n in cm.clustered)


def test_spend_slack_spends_what_the_file_leaves_below_its_target():
    sd = sparse_state_dict(seed=3)
    tables = {}
    cm, plan = compress_to_ratio(sd, 12.0, tables_out=tables)
    size, error = len(cm.to_bytes()), _weight_error(cm, sd)
    new, grown = spend_slack(cm, sd, tables, plan, int(size * 1.3))
    assert new != plan and all(new[n] in tables[n] for n in new)
    assert size < grown == len(cm.to_bytes()) <= int(size * 1.3)
    assert _weight_error(cm, sd) < error
    back = deserialize(cm.to_bytes())
    assert all(torch.equal(back.reconstruct(n), cm.reconstruct(n)) for n in cm.clustered)
    # a file at its target is left as it is
    before = cm.to_bytes()
    assert spend_slack(cm, sd, tables, new, len(before)) == (new, len(before)) and cm.to_bytes() == before


def test_restore_gives_back_a_snapshot():
    sd = sparse_state_dict(seed=4)
    cm, _ = compress_to_ratio(sd, 8.0)
    before, state = cm.to_bytes(), snapshot(cm)
    cm.tensors["l0.weight"].indices = torch.zeros_like(cm.tensors["l0.weight"].indices)
    cm.codebooks[0] = cm.codebooks[0] * 2
    restore(cm, state)
    assert cm.to_bytes() == before
