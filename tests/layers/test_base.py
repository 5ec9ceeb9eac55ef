"""LayerCache: the preallocated buffer path against the plain torch.cat growth it replaces."""
import torch

from moelab.layers.base import KVCache, LayerCache


def _cat_reference(chunks):
    return torch.cat(chunks, dim=-2)


def test_preallocated_cache_equals_cat_and_writes_in_place():
    torch.manual_seed(0)
    cache = LayerCache(capacity=12)
    chunks = [torch.randn(2, 3, 5, 4)] + [torch.randn(2, 3, 1, 4) for _ in range(7)]
    for i, c in enumerate(chunks):
        k = cache.update(k=c, v=2 * c)
        assert torch.equal(k["k"], _cat_reference(chunks[:i + 1]))
        assert torch.equal(k["v"], 2 * _cat_reference(chunks[:i + 1]))
    buf = cache._buffers["k"]
    assert buf.shape[-2] == 12 and cache.tensors["k"].data_ptr() == buf.data_ptr()


def test_cache_grows_past_capacity_by_doubling():
    cache = LayerCache()  # no capacity hint: exact first, then doubling
    chunks = [torch.randn(1, 2, 3, 4)] + [torch.randn(1, 2, 1, 4) for _ in range(9)]
    sizes = set()
    for i, c in enumerate(chunks):
        assert torch.equal(cache.update(k=c)["k"], _cat_reference(chunks[:i + 1]))
        sizes.add(cache._buffers["k"].shape[-2])
    assert sizes == {3, 6, 12}


def test_replaced_entries_are_copied_not_overwritten():
    """The transformers wrapper reorders / crops `tensors`; zero-shot scoring expands them."""
    torch.manual_seed(0)
    cache = LayerCache(capacity=8)
    a, b, c = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    cache.update(k=a)
    reordered = cache.tensors["k"].flip(0)
    cache.tensors["k"] = reordered.clone()
    assert torch.equal(cache.update(k=b)["k"], torch.cat([a.flip(0), b], -2))
    cache.tensors["k"] = cache.tensors["k"][..., :2, :]  # crop: a prefix view of the buffer
    assert torch.equal(cache.update(k=c)["k"], torch.cat([a.flip(0)[..., :2, :], c], -2))
    src = LayerCache(capacity=8)
    src.update(k=a[:1])
    expanded = LayerCache()
    expanded.tensors = {"k": src.tensors["k"].expand(3, -1, -1, -1)}
    out = expanded.update(k=torch.randn(3, 1, 1, 4))["k"]
    assert torch.equal(out[:, :, :3], a[:1].expand(3, -1, -1, -1))
    assert torch.equal(src.tensors["k"], a[:1])  # the source cache is untouched


def test_autograd_inputs_fall_back_to_cat():
    cache = LayerCache(capacity=8)
    a = torch.randn(1, 1, 2, 4, requires_grad=True)
    b = torch.randn(1, 1, 1, 4, requires_grad=True)
    cache.update(k=a)
    k = cache.update(k=b)["k"]
    k.sum().backward()
    assert torch.equal(a.grad, torch.ones_like(a)) and torch.equal(b.grad, torch.ones_like(b))
    assert "k" not in cache._buffers


def test_kvcache_passes_capacity_to_every_layer():
    kv = KVCache(3, capacity=10)
    assert [layer.capacity for layer in kv.layers] == [10, 10, 10]
