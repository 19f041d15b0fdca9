"""snoo.param_groups: role detection on GPT-like, LLaMA-like and tied models; optimizers refuse untagged groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import snoo

V, D = 64, 16


class GPTLike(nn.Module):
    """nanoGPT's shape: token and position embeddings, LayerNorm blocks with biases, an lm_head (tied or not)."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.wpe = nn.Embedding(8, D)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln_1": nn.LayerNorm(D),
                    "attn": nn.Linear(D, 3 * D),
                    "proj": nn.Linear(D, D),
                    "ln_2": nn.LayerNorm(D),
                    "fc": nn.Linear(D, 4 * D),
                    "fc_proj": nn.Linear(4 * D, D),
                }
            )
            for _ in range(2)
        )
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
        if tied:
            self.wte.weight = self.lm_head.weight  # nanoGPT ties this way round


class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(D, 3 * D, bias=False)
        self.w3 = nn.Linear(D, 3 * D, bias=False)
        self.w2 = nn.Linear(3 * D, D, bias=False)


class LlamaLike(nn.Module):
    """LLaMA's shape: one embedding, RMSNorm, bias-free attention and SwiGLU, an untied output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(V, D)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "attention_norm": nn.RMSNorm(D),
                    "wq": nn.Linear(D, D, bias=False),
                    "wk": nn.Linear(D, D, bias=False),
                    "wv": nn.Linear(D, D, bias=False),
                    "wo": nn.Linear(D, D, bias=False),
                    "ffn_norm": nn.RMSNorm(D),
                    "feed_forward": SwiGLU(),
                }
            )
            for _ in range(2)
        )
        self.norm = nn.RMSNorm(D)
        self.output = nn.Linear(D, V, bias=False)


def roles_by_name(model: nn.Module, groups: list[dict]) -> dict[str, str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["role"] for g in groups for p in g["params"]}


def test_gpt_untied_roles() -> None:
    model = GPTLike(tied=False)
    roles = roles_by_name(model, snoo.param_groups(model))
    assert roles["wte.weight"] == roles["wpe.weight"] == "embedding"
    assert roles["lm_head.weight"] == "head"
    assert roles["blocks.0.attn.weight"] == roles["blocks.1.fc_proj.weight"] == "matrix"
    assert roles["blocks.0.attn.bias"] == roles["blocks.0.ln_1.weight"] == roles["ln_f.bias"] == "vector"
    assert len(roles) == len(list(model.parameters()))


def test_group_order_and_fresh_dicts() -> None:
    model = GPTLike(tied=False)
    groups = snoo.param_groups(model)
    assert [g["role"] for g in groups] == ["embedding", "matrix", "head", "vector"]
    groups[0]["lr"] = 1.0
    assert "lr" not in snoo.param_groups(model)[0]
    # model order inside a group
    assert groups[1]["params"][0] is model.blocks[0]["attn"].weight


def test_gpt_tied_asks_for_head() -> None:
    model = GPTLike(tied=True)
    with pytest.raises(ValueError, match=r"tied.*head="):
        snoo.param_groups(model)


@pytest.mark.parametrize("head", ["lm_head", "lm_head.weight", "wte.weight", "module", "tensor"])
def test_gpt_tied_with_head_given_lists_shared_tensor_once_as_head(head: str) -> None:
    model = GPTLike(tied=True)
    arg = {"module": model.lm_head, "tensor": model.lm_head.weight}.get(head, head)
    groups = snoo.param_groups(model, head=arg)
    tensors = [p for g in groups for p in g["params"]]
    assert len(tensors) == len({id(p) for p in tensors}) == len(list(model.parameters()))
    head_group = next(g for g in groups if g["role"] == "head")
    assert head_group["params"] == [model.lm_head.weight]
    emb_group = next(g for g in groups if g["role"] == "embedding")
    assert [p.shape for p in emb_group["params"]] == [model.wpe.weight.shape]


def test_gpt_tied_head_false_keeps_embedding() -> None:
    model = GPTLike(tied=True)
    groups = snoo.param_groups(model, head=False)
    assert "head" not in [g["role"] for g in groups]
    emb = next(g for g in groups if g["role"] == "embedding")["params"]
    assert any(p is model.wte.weight for p in emb)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_llama_roles() -> None:
    model = LlamaLike()
    roles = roles_by_name(model, snoo.param_groups(model))
    assert roles["tok_embeddings.weight"] == "embedding"
    assert roles["output.weight"] == "head"
    assert roles["layers.0.feed_forward.w1.weight"] == roles["layers.1.wo.weight"] == "matrix"
    assert roles["layers.0.attention_norm.weight"] == roles["norm.weight"] == "vector"
    assert list(roles.values()).count("head") == 1


def test_cannot_tell_head_asks_for_it() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))  # no embedding: not a language model
    with pytest.raises(ValueError, match="head="):
        snoo.param_groups(model)
    roles = roles_by_name(model, snoo.param_groups(model, head=model[2]))
    assert roles == {"0.weight": "matrix", "0.bias": "vector", "2.weight": "head", "2.bias": "vector"}
    assert "head" not in [g["role"] for g in snoo.param_groups(model, head=False)]


def test_bad_head_arguments() -> None:
    model = LlamaLike()
    with pytest.raises(ValueError, match="nope"):
        snoo.param_groups(model, head="nope")
    with pytest.raises(ValueError, match="2-D"):
        snoo.param_groups(model, head="norm.weight")
    with pytest.raises(ValueError, match="not a parameter of the model"):
        snoo.param_groups(model, head=nn.Linear(D, V))
    with pytest.raises(TypeError, match="head"):
        snoo.param_groups(model, head=True)
    with pytest.raises(TypeError, match="model"):
        snoo.param_groups([model.output.weight])  # type: ignore[arg-type]


def test_frozen_skipped_and_conv_is_matrix() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    model[0].bias.requires_grad_(False)
    groups = snoo.param_groups(model, head=model[2])
    roles = roles_by_name(model, groups)
    assert roles == {"0.weight": "matrix", "2.weight": "head", "2.bias": "vector"}


def _opts() -> list:
    return [
        lambda g: snoo.SCALE(g),
        lambda g: snoo.SGDLL(g),
        lambda g: snoo.MuonAdamW(g),
    ]


@pytest.mark.parametrize("make", _opts(), ids=["SCALE", "SGDLL", "MuonAdamW"])
def test_optimizers_refuse_groups_without_role(make) -> None:
    model = LlamaLike()
    with pytest.raises(ValueError, match=r"'role'.*snoo.param_groups"):
        make(model.parameters())
    with pytest.raises(ValueError, match="unknown role"):
        make([{"params": [model.output.weight], "role": "output"}])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        make([{"params": [model.norm.weight], "role": "matrix"}])
    opt = make(snoo.param_groups(model))
    with pytest.raises(ValueError, match="'role'"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


@pytest.mark.parametrize("make", _opts(), ids=["SCALE", "SGDLL", "MuonAdamW"])
def test_one_groups_list_builds_several_optimizers(make) -> None:
    """Optimizers copy the group dicts: one optimizer's defaults never leak into the next one's groups."""
    model = LlamaLike()
    groups = snoo.param_groups(model)
    snoo.SCALE(groups, lr=0.123)
    opt = make(groups)
    assert all("lr" not in g for g in groups)
    assert 0.123 not in [g["lr"] for g in opt.param_groups]
