"""The Python side of `swift bench preprocess` (see docs/PERFORMANCE.md).

  train OUT_DIR CORPUS_JSONL VOCAB_SIZE TEMPLATE_MODEL_DIR
      trains a byte-level BPE on the corpus (the Hub is out of reach) and writes a
      model folder around it (tokenizer.json, tokenizer_config.json with the
      template model's chat template, its config.json); prints the vocabulary reached.
  run MODEL_DIR DATA_JSONL MAX_LENGTH NUM_PROC
      the path people use today: datasets.map with a fast tokenizer and
      apply_chat_template (assistant masks by prefix renders, as swift does), then
      best-fit-decreasing packing; prints {"seconds", "samples", "tokens", "rows"}.
"""

import bisect
import json
import os
import shutil
import sys
import time


def train(out_dir, corpus, vocab_size, template_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(corpus, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= 20000:
                    break
                for m in json.loads(line)["messages"]:
                    yield m["content"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts(), trainer)
    os.makedirs(out_dir, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.save_pretrained(out_dir)
    template_config = json.load(open(os.path.join(template_dir, "tokenizer_config.json"), encoding="utf-8"))
    config = json.load(open(os.path.join(out_dir, "tokenizer_config.json"), encoding="utf-8"))
    config["chat_template"] = template_config["chat_template"]
    json.dump(config, open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8"), ensure_ascii=False)
    jinja = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)
    shutil.copy(os.path.join(template_dir, "config.json"), os.path.join(out_dir, "config.json"))
    print(json.dumps({"vocab": tok.get_vocab_size()}))


def run(model_dir, data, max_length, num_proc):
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(row):
        messages = row["messages"]

        def tokens(ms, gen):
            return tok(tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen), add_special_tokens=False)["input_ids"]

        ids = tokens(messages, False)
        labels = [0] * len(ids)
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                start, end = len(tokens(messages[:k], True)), min(len(tokens(messages[: k + 1], False)), len(ids))
                labels[start:end] = [1] * (end - start)
        return {"input_ids": ids[:max_length], "labels": labels[:max_length]}

    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=os.path.join(os.path.dirname(data), ".hf-datasets"))
    ds = ds.map(encode, num_proc=num_proc, remove_columns=ds.column_names, load_from_cache_file=False)
    lengths = [len(x) for x in ds["input_ids"]]
    # best-fit decreasing packing
    free, rows = [], 0
    for length in sorted(lengths, reverse=True):
        i = bisect.bisect_left(free, length)
        if i < len(free):
            space = free.pop(i)
        else:
            space, rows = max_length, rows + 1
        if space - length > 0:
            bisect.insort(free, space - length)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "samples": len(lengths), "tokens": sum(lengths), "rows": rows}))


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
