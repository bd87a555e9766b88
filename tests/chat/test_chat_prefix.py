"""The prefix cache (prefix.py): the block tree on its own (what is stored, shared, matched, evicted, pinned),
and on the tiny demo Qwen in fp32 on the CPU, a conversation's next turn that prefills only its new suffix and
decodes exactly the tokens of a slot batch without the cache, also when hits and misses join in one admission."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from workers.chat.generation import GenerationRequest
from workers.chat.models import ModelName
from workers.chat.prefix import BLOCK, PrefixCache, bytes_needed
from workers.chat.sampling import SamplingParams
from workers.chat.slot_batch import SlotBatch

from .conftest import drive

CONFIG = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, num_attention_heads=4, hidden_size=16,
                         head_dim=8)


def slots(count: int = 4, length: int = 256) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    shape = (count, 2, length, 8)
    return ([torch.randn(shape, generator=generator) for _ in range(2)],
            [torch.randn(shape, generator=generator) for _ in range(2)])


def test_store_match_and_load_copy_the_blocks_exactly():
    cache = PrefixCache(CONFIG, 10 * BLOCK, torch.float32, torch.device("cpu"))
    keys, values = slots()
    sequence = list(range(3 * BLOCK + 5))
    assert cache.store(keys, values, 1, sequence) == 3          # only whole blocks
    assert cache.store(keys, values, 1, sequence) == 0          # already there
    match = cache.match(sequence + [999])
    assert match.tokens == 3 * BLOCK
    gathered = cache.gather(match)
    cache.release(match)
    for got, tensor in zip(gathered[0] + gathered[1], keys + values):
        assert torch.equal(got[0], tensor[1, :, :3 * BLOCK])
    assert cache.match(list(range(3 * BLOCK))).tokens == 2 * BLOCK   # at least one prompt token is left to prefill
    assert cache.match([7] + sequence).tokens == 0
    assert cache.describe()["used_tokens"] == 3 * BLOCK and cache.counters["hits"] == 2
    assert bytes_needed(CONFIG, 10 * BLOCK + 3, torch.float32) == cache.nbytes


def test_a_shared_start_is_stored_once_and_a_diverging_block_does_not_match():
    cache = PrefixCache(CONFIG, 10 * BLOCK, torch.float32, torch.device("cpu"))
    keys, values = slots()
    system = list(range(2 * BLOCK))
    assert cache.store(keys, values, 0, system + [1] * BLOCK) == 3
    assert cache.store(keys, values, 2, system + [2] * BLOCK) == 1   # the two system blocks are shared
    other = cache.match(system + [2] * BLOCK + [5])
    assert other.tokens == 3 * BLOCK
    (got, *_), _ = cache.gather(other)   # the first layer's keys: slot 0's system blocks, slot 2's own third
    assert torch.equal(got[0, :, :2 * BLOCK], keys[0][0, :, :2 * BLOCK])
    assert torch.equal(got[0, :, 2 * BLOCK:], keys[0][2, :, 2 * BLOCK:3 * BLOCK])
    assert cache.match(system + [1] * (BLOCK - 1) + [3] + [0]).tokens == 2 * BLOCK   # one token differs


def test_least_recently_used_leaves_go_first_and_pinned_blocks_stay():
    cache = PrefixCache(CONFIG, 4 * BLOCK, torch.float32, torch.device("cpu"))
    keys, values = slots()
    a, b, c = ([n] * (2 * BLOCK) for n in (1, 2, 3))
    cache.store(keys, values, 0, a)
    cache.store(keys, values, 1, b)
    cache.release(cache.match(a + [0]))                       # a is now the more recent
    assert cache.store(keys, values, 2, c) == 2              # evicts b's leaf, then b's root
    assert cache.match(b + [0]).tokens == 0 and cache.match(a + [0]).tokens == 2 * BLOCK
    assert cache.counters["evictions"] == 2
    pinned = [cache.match(a + [0]), cache.match(c + [0])]    # everything pinned: nothing can go
    assert cache.store(keys, values, 1, b) == 0
    for match in pinned:
        cache.release(match)
    assert cache.store(keys, values, 1, b) == 2


def test_an_empty_pool_stores_and_matches_nothing():
    cache = PrefixCache(CONFIG, BLOCK - 1, torch.float32, torch.device("cpu"))
    keys, values = slots()
    assert cache.store(keys, values, 0, list(range(64))) == 0 and cache.match(list(range(64))).tokens == 0


@pytest.fixture(scope="module")
def loaded(handler):
    return handler.store.get(ModelName.INSTRUCT)


def request(ids: list[int], max_tokens: int = 20) -> GenerationRequest:
    return GenerationRequest(ModelName.INSTRUCT, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))


def random_ids(vocab: int, length: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_the_next_turn_prefills_only_its_suffix_and_decodes_the_same_tokens(loaded):
    vocab = loaded.model.config.vocab_size
    first = random_ids(vocab, 100, 1)
    cached = SlotBatch(loaded, slots=4, cuda_graphs=False, prefix_tokens=4096)
    plain = SlotBatch(loaded, slots=4, cuda_graphs=False)
    (reply,) = drive(cached, {0: [request(first)]})
    assert drive(plain, {0: [request(first)]}) == [reply] and len(reply) == 20
    # the first turn's KV up to its last fed token (100 + 19) is stored: 7 whole blocks
    second = first + reply + random_ids(vocab, 30, 2)
    other, fresh = random_ids(vocab, 60, 3), random_ids(vocab, 45, 4)
    turns = {0: [request(other), request(second), request(fresh)]}   # a hit between two misses, one admission
    reused_before = cached.prefix.counters["tokens_reused"]
    assert drive(cached, turns) == drive(plain, {0: [request(other), request(second), request(fresh)]})
    assert cached.prefix.counters["tokens_reused"] - reused_before == 7 * BLOCK
    assert cached.describe()["prefix_cache"]["hits"] >= 1 and plain.describe()["prefix_cache"] is None
    third = second + [5, 6, 7]
    assert drive(cached, {0: [request(third, 8)]}) == drive(plain, {0: [request(third, 8)]})
    assert cached.prefix.counters["tokens_reused"] - reused_before > 7 * BLOCK + 8 * BLOCK   # the second turn too


def test_a_hit_leaves_the_slot_holding_the_kv_a_full_prefill_computes(loaded):
    """Tokens alone are a weak check on a tiny random model (its argmax rarely moves): compare the KV itself,
    every layer and column, of the prompt admitted with a hit against the same prompt prefilled whole."""
    vocab = loaded.model.config.vocab_size
    first = random_ids(vocab, 70, 5)
    cached = SlotBatch(loaded, slots=4, cuda_graphs=False, prefix_tokens=4096)
    plain = SlotBatch(loaded, slots=4, cuda_graphs=False)
    (reply,) = drive(cached, {0: [request(random_ids(vocab, 40, 6), 40)], 2: [request(first)]})[1:]   # slot 1
    prompt = first + reply + random_ids(vocab, 25, 7)
    with torch.inference_mode():
        cached.admit([request(random_ids(vocab, 33, 8)), request(prompt)])
        plain.admit([request(random_ids(vocab, 33, 8)), request(prompt)])
    assert cached.prefix.counters["tokens_reused"] == (70 + 19) // BLOCK * BLOCK
    slot = next(i for i, row in enumerate(cached.rows) if row.request.prompt_ids == prompt)
    twin = next(i for i, row in enumerate(plain.rows) if row.request.prompt_ids == prompt)
    for ours, theirs in zip(cached.cache.keys + cached.cache.values, plain.cache.keys + plain.cache.values):
        torch.testing.assert_close(ours[slot, :, :len(prompt)], theirs[twin, :, :len(prompt)], rtol=1e-4, atol=1e-5)
    assert cached._tokens[slot] == plain._tokens[twin]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_with_graphs_a_hit_holds_the_full_prefill_kv_and_decodes_the_same_tokens():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from workers.chat.models import LoadedModel

    device = torch.device("cuda")
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=4096)).eval()
    model.config._attn_implementation = "sdpa"
    loaded = LoadedModel(ModelName.INSTRUCT, model.requires_grad_(False), None, device, frozenset(), 2048)
    cached = SlotBatch(loaded, slots=4, prefix_tokens=4096)
    plain = SlotBatch(loaded, slots=4)
    assert cached.path == "cuda_graphs"
    first = random_ids(1000, 300, 9)
    (reply,) = drive(cached, {0: [request(first)]})
    prompt = first + reply + random_ids(1000, 40, 10)
    assert drive(cached, {0: [request(prompt, 30)]}) == drive(plain, {0: [request(prompt, 30)]})
    assert cached.prefix.counters["tokens_reused"] == (300 + 19) // BLOCK * BLOCK
