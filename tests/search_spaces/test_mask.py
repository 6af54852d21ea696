from __future__ import annotations

from search_spaces import Block, Mask, mask_key


def test_canonical_json_is_order_independent():
    a = Mask(frozenset({3, 1}), frozenset({2}), ((5, 2), (1, 1)), ((0, 64),))
    b = Mask.from_json('{"mlp_width":{"0":64},"head_units":{"1":1,"5":2},"mlp_removed":[2],"attn_removed":[1,3]}')
    assert a == b and a.to_json() == b.to_json() and hash(a) == hash(b)
    assert Mask.from_json(a.to_json()) == a


def test_key_depends_on_mask_model_and_calibration():
    m = Mask(frozenset({1}))
    keys = {mask_key(m, "m", "c"), mask_key(m, "m2", "c"), mask_key(m, "m", "c2"), mask_key(Mask(), "m", "c")}
    assert len(keys) == 4
    assert mask_key(m, "m", "c") == mask_key(Mask.from_json(m.to_json()), "m", "c")


def test_block_index_order_and_first_difference():
    assert [str(Block.from_index(i)) for i in range(4)] == ["attn0", "mlp0", "attn1", "mlp1"]
    base = Mask(frozenset({2}))
    assert base.first_difference(base.remove(Block(3, "mlp")), num_layers=4) == 7
    assert base.first_difference(base.with_heads(1, 1), num_layers=4) == 2
    assert base.first_difference(Mask(frozenset({2})), num_layers=4) is None


def test_zero_width_is_removal_and_removal_drops_width():
    assert Mask().with_mlp_width(2, 0) == Mask(mlp_removed=frozenset({2}))
    assert Mask().with_heads(1, 1).remove(Block(1, "attn")) == Mask(attn_removed=frozenset({1}))
