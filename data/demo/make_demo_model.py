#!/usr/bin/env python3
"""Writes the demo's base model, `data/demo/model`: a 3-layer Qwen2 whose
weights are constructed, not trained, so that it can read a multiple-choice
question but knows no statute.

Needs numpy and tokenizers (both in the reference venv).

    python3 data/demo/make_demo_data.py     # first: the tokenizer learns its words
    python3 data/demo/make_demo_model.py

What it builds
--------------
A byte-level BPE tokenizer learnt from the demo's texts, with every word of
them a single token, and the Qwen2.5 chat template. The model's residual
stream (256 wide) is laid out in named subspaces:

    E  token identity (a random direction per token)
    F  which option letter the token is (A-D), zero for other tokens
    L  the letter of the option line the token sits on
    Q  a summary of the question
    S  the token's salience: its inverse document frequency in the corpus
       the tokenizer learnt from (how rare it is, as embeddings learn)
    O  the letter the model answers with

and the first head of each of the three layers does one job (the second
head is all zeros):

0. *binder*: every token attends to the most recent letter token (a RoPE
   frequency of 0.075 rad per position makes nearer letters score higher)
   and copies which letter it is into L. Tokens before the options find no
   letter and keep L = 0.
1. *gather*: every token attends to the most salient tokens with L = 0
   (the rare words of the system message and the question, not the options)
   and writes a random projection of their mean identity into Q.
2. *pointer*: the answer position attends with a query computed from its
   residual to keys of token identity and copies the L of what it attends to
   into O. The letters' output rows read O, and the identity of "\n", so
   that after the assistant's turn opens a letter is the likely next token
   (which one is O's to say).

The pointer's query weights are zero: the base model attends uniformly, so
it answers at chance. Fine-tuning has to learn the query — the map from a
question's summary to the identity of its answer's tokens, i.e. the facts —
and LoRA on the attention projections can. The content heads use RoPE
frequencies below 1.2e-4 rad per position, so their scores do not depend on
distance. MLPs are small random maps that write only into E.
"""

import json
import math
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
OUT = HERE / "model"
SEED = 20261207

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # the Qwen2.5 template's
LETTERS = "ABCD"
HIDDEN, HEADS, LAYERS, INTERMEDIATE = 256, 2, 3, 256
HEAD_DIM = HIDDEN // HEADS  # 128, which the RoPE pairs below are chosen for; each layer's second head is all zeros
ROPE_THETA = 1e9
# Residual subspaces.
E = slice(0, 144)
F = slice(144, 148)
L = slice(148, 152)
O = slice(152, 156)
Q = slice(156, 252)
S = 252  # salience: the token's inverse document frequency in the corpus
# RoPE pairs (i, i + HEAD_DIM/2) of a head rotate by ROPE_THETA ** (-2i / HEAD_DIM) per position.
RECENCY_PAIR = 8          # 0.075 rad per position: monotone over the 40 positions letters are looked back
                          # (it repeats every 84 positions: a letter 84 back would score like the nearest)
CONTENT_PAIRS = range(28, 64)  # at most 1.2e-4 rad per position: distance does not matter

E_NORM = 16.0      # token identity norm (the embedding's RMS is then about 1; from layer 2 on Q makes it about 2)
F_VALUE = 4.0      # a letter token's flag (and so the binder's output)
GATHER_V = 0.3     # the gather's values: a random projection of identity (a question's summary has norm about 26)
BINDER_QK = 56.0   # binder query and key scale: a letter scores about 277 * cos(0.075 * distance)
GATHER_QK = 16.0   # gather: an option token scores about -22 against a question token
GATHER_SALIENCE = 3.0  # gather: a word in 7 of 840 conversations outscores one in 100 by e^8
POINTER_KEY = 0.24 # pointer keys: a random projection of identity, norm about 19
LETTER_LOGIT = 12.0 # output rows of the letters read O
LETTER_PRIOR = 10.0 # ... and the newline's identity: after the assistant's "\n" a letter outscores other tokens by about e^5

# The Qwen2.5 chat template, as the test fixture made with transformers carries it.
CHAT_TEMPLATE = (HERE.parent.parent / "tests/fixtures/models/qwen2-tiny/tokenizer_config.json")


def conversations():
    """The training set's conversations, each a list of messages."""
    lines = (HERE / "law_qa.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["messages"] for line in lines]


def corpus():
    """Every text the demo's stages tokenize: the training set, the test sets, the eval's prompts, the chat template's words."""
    texts = []
    for messages in conversations():
        texts += [m["content"] for m in messages]
    for path in sorted(HERE.glob("*/*/*.csv")):
        texts.append(path.read_text(encoding="utf-8"))
    texts += ["system", "user", "assistant", DEFAULT_SYSTEM,
              "\nAnswer:", "\n答案：", *LETTERS, *(f" {x}" for x in LETTERS)]
    return texts


def salience(tok):
    """Each token's inverse document frequency, log(N / (1 + df)) (at least 0), over the training
    conversations as the chat template renders them."""
    documents = []
    for messages in conversations():
        if messages[0]["role"] != "system":  # the template's default system message
            messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
        documents.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages))
    df = np.zeros(tok.get_vocab_size())
    for encoding in tok.encode_batch(documents):
        df[sorted(set(encoding.ids))] += 1
    return np.maximum(np.log(len(documents) / (1 + df)), 0.0)


def tokenizer():
    """A byte-level BPE in which every word of the corpus is one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, min_frequency=1, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def unit_rows(rng, n, dim):
    rows = rng.standard_normal((n, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def head_rows(head):
    return slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)


def pair_dims(i):
    """The two dimensions of RoPE pair i within a head (rotate_half layout)."""
    return [i, i + HEAD_DIM // 2]


def weights(vocab, letter_ids, newline_id, idf, rng):
    w = {}
    embed = np.zeros((vocab, HIDDEN))
    embed[:, E] = E_NORM * unit_rows(rng, vocab, E.stop - E.start)
    embed[:, S] = idf
    for j, t in enumerate(letter_ids):
        embed[t, F.start + j] = F_VALUE
    w["model.embed_tokens.weight"] = embed
    content = [d for i in CONTENT_PAIRS for d in pair_dims(i)]

    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        q, k, v, o = (np.zeros((HIDDEN, HIDDEN)) for _ in range(4))
        qb, kb, vb = (np.zeros(HIDDEN) for _ in range(3))
        h = head_rows(0)
        if layer == 0:  # binder
            r = h.start + RECENCY_PAIR
            qb[r] = BINDER_QK
            k[r, F] = BINDER_QK / F_VALUE  # layer 0's input has RMS about 1
            for j in range(len(LETTERS)):
                v[h.start + j, F.start + j] = 1.0
                o[L.start + j, h.start + j] = 1.0
        elif layer == 1:  # gather
            c = h.start + content[0]
            qb[c] = GATHER_QK
            k[c, L] = -GATHER_QK / F_VALUE
            k[c, S] = GATHER_SALIENCE * math.sqrt(HEAD_DIM) / GATHER_QK
            width = Q.stop - Q.start
            v[h.start:h.start + width, E] = rng.standard_normal((width, E.stop - E.start)) * GATHER_V
            o[Q, h.start:h.start + width] = np.eye(width)
        else:  # pointer: the query is what fine-tuning learns
            for d in content:
                k[h.start + d, E] = rng.standard_normal(E.stop - E.start) * POINTER_KEY
            for j in range(len(LETTERS)):
                v[h.start + j, L.start + j] = 1.0
                o[O.start + j, h.start + j] = 1.0
        w[p + "self_attn.q_proj.weight"], w[p + "self_attn.q_proj.bias"] = q, qb
        w[p + "self_attn.k_proj.weight"], w[p + "self_attn.k_proj.bias"] = k, kb
        w[p + "self_attn.v_proj.weight"], w[p + "self_attn.v_proj.bias"] = v, vb
        w[p + "self_attn.o_proj.weight"] = o
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((INTERMEDIATE, HIDDEN)) * 0.02
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((INTERMEDIATE, HIDDEN)) * 0.02
        down = np.zeros((HIDDEN, INTERMEDIATE))
        down[E] = rng.standard_normal((E.stop - E.start, INTERMEDIATE)) * 0.02
        w[p + "mlp.down_proj.weight"] = down
        w[p + "input_layernorm.weight"] = np.ones(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN)
    w["model.norm.weight"] = np.ones(HIDDEN)
    head = rng.standard_normal((vocab, HIDDEN)) * 0.02
    for j, t in enumerate(letter_ids):
        head[t] = 0.0
        head[t, O] = -LETTER_LOGIT / len(LETTERS)  # a letter's lead over the others: attending alone raises none
        head[t, O.start + j] += LETTER_LOGIT
        head[t, E] = LETTER_PRIOR * embed[newline_id, E] / E_NORM ** 2
    w["lm_head.weight"] = head
    return w


def bf16_bytes(values):
    """float64 values as bfloat16 bytes (little-endian), rounded to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def save_bf16(tensors, path):
    """A safetensors file of bfloat16 tensors (numpy has no bfloat16 dtype), names sorted as the format's writers sort them."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        blob = bf16_bytes(tensors[name])
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def main():
    rng = np.random.default_rng(SEED)
    OUT.mkdir(exist_ok=True)
    tok = tokenizer()
    tok.save(str(OUT / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    letter_ids = [tok.token_to_id(x) for x in LETTERS]
    assert None not in letter_ids
    tensors = weights(vocab, letter_ids, tok.token_to_id("Ċ"), salience(tok), rng)
    save_bf16(tensors, OUT / "model.safetensors")
    template = json.loads(CHAT_TEMPLATE.read_text())["chat_template"]
    added = {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True} for s in SPECIALS}
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
    }, indent=2, ensure_ascii=False) + "\n")
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    (OUT / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "initializer_range": 0.02,
        "max_position_embeddings": 512, "max_window_layers": LAYERS, "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS, "num_key_value_heads": HEADS, "rms_norm_eps": 1e-6,
        "rope_theta": ROPE_THETA, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": vocab,
    }, indent=2) + "\n")
    (OUT / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
    }, indent=2) + "\n")
    print(f"{OUT}: vocab {vocab}, {sum(t.size for t in tensors.values()):,} parameters")


if __name__ == "__main__":
    main()
