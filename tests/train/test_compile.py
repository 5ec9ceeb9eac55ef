"""train.compile: one graph (fullgraph) for models without routers, graph breaks allowed
around the routed engine. Traced with the aot_eager backend: the same Dynamo capture as
inductor, without its minute of C++ code generation per model."""
import pytest
import torch

from helpers import tiny
from moelab.model import MoELM
from moelab.train.loop import compile_model


@pytest.mark.parametrize("preset", ["dense-tiny", "gated-tiny"])
def test_models_without_routers_compile_as_one_graph(preset):
    torch.manual_seed(0)
    m = MoELM(tiny(base=preset).model).train()
    x = torch.randint(0, 97, (2, 12))
    torch._dynamo.reset()
    cm = compile_model(m, backend="aot_eager")  # fullgraph=True: a graph break would raise
    out = cm(x, x)
    out.loss.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ref = m(x, x)
    ref.loss.backward()
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)
    for g, p in zip(grads, m.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_routed_models_compile_with_graph_breaks(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.update(kw) or model)
    compile_model(MoELM(tiny(base="moe-tiny").model))
    assert seen["fullgraph"] is False
    compile_model(MoELM(tiny().model))
    assert seen["fullgraph"] is True


def test_routed_model_whose_eager_choice_is_grouped_mm_traces(monkeypatch):
    """torch 2.13's fake-tensor grouped_mm takes only bf16: under dynamo `auto` must not pick it
    for float32 (eager does, for small expert matmuls). Dynamo's trace with the eager backend
    is enough to hit the fake kernel."""
    from moelab.ops import backends

    cfg = tiny("model.ffn.kind=moe", "model.ffn.n_experts=4", "model.ffn.top_k=2",
               "model.ffn.expert_dim=16").model
    torch.manual_seed(0)
    m = MoELM(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    picked = []
    orig = backends.choose_backend
    monkeypatch.setattr(backends, "choose_backend",
                        lambda *a, **kw: picked.append(orig(*a, **kw)) or picked[-1])
    ref = m(x, x).loss
    assert "grouped_mm" in picked  # the eager choice this test is about
    torch._dynamo.reset()
    loss = compile_model(m, backend="eager")(x, x).loss
    loss.backward()
    assert torch.allclose(loss, ref, atol=1e-5)
