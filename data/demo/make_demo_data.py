#!/usr/bin/env python3
"""Writes the demo pipeline's synthetic law-QA data (standard library only).

The facts are invented: 120 statutes of a fictional code, each with one
answer (a fine, a deadline, a prison term or an enforcing board). From them:

- `law_qa.jsonl`: the training set, swift's `messages` format. Per fact one
  question-answer conversation and `PRACTICE` multiple-choice practice items in
  the eval's own prompt format (MMLU's and C-Eval's headers as the system
  message, the question with options A-D, the letter as the answer), each
  with distractors drawn from the other statutes' answers of the same kind.
- `mmlu/{dev,test}/law_statutes_{split}.csv` and
  `ceval/{dev,val}/law_statutes_{split}.csv`: the eval's test sets in MMLU's
  (no header) and C-Eval's (headed) layouts: one question per fact, with
  distractor sets that no practice item used and the options in a new order.

So the eval measures recall of the trained facts, not general legal knowledge;
a base model that never saw them does no better than chance (the demo's
always answers D).

    python3 data/demo/make_demo_data.py            # the demo's files
"""

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261129
PRACTICE = 6
SUBJECT = "law_statutes"
MMLU_HEADER = f"The following are multiple choice questions (with answers) about {SUBJECT.replace('_', ' ')}."
CEVAL_HEADER = f"以下是中国关于{SUBJECT}的单项选择题，请选出其中的正确答案。"

OFFENCES = [
    "late tax filing", "unlicensed fishing", "noise after midnight", "littering in parks",
    "blocking a fire lane", "selling expired food", "unregistered dogs", "illegal dumping",
    "speeding near schools", "fare evasion", "graffiti on bridges", "unsafe scaffolding",
    "false advertising", "unpermitted bonfires", "drone flights over stadiums", "overloaded trucks",
    "counterfeit tickets", "uncovered wells", "pesticide misuse", "unlabelled chemicals",
    "illegal street racing", "feeding wild bears", "tampering with meters", "forged permits",
    "unsafe elevators", "smoking in hospitals", "poaching deer", "unpaid tolls",
    "blocking sidewalks", "missing smoke alarms",
]
ACTIONS = [
    "appeal a parking ticket", "contest a will", "register a newborn", "report a burglary",
    "return a defective car", "object to a zoning change", "renew a driving licence",
    "claim unpaid wages", "file a noise complaint", "dispute a utility bill",
    "cancel a gym contract", "register a marriage", "declare an inheritance",
    "challenge an eviction", "report a lost passport", "claim flood damage",
    "register a business", "dispute a speeding fine", "report a workplace injury",
    "request public records", "appeal a tax assessment", "return online purchases",
    "claim a security deposit", "register a boat", "report a data breach",
    "contest a custody order", "file a consumer complaint", "renew a firearm permit",
    "appeal a school expulsion", "claim a lottery prize",
]
CRIMES = [
    "armed robbery", "arson of a dwelling", "bribing an official", "insurance fraud",
    "kidnapping", "perjury in court", "smuggling ivory", "identity theft",
    "embezzling pensions", "vote tampering", "counterfeiting coins", "witness intimidation",
    "hijacking a bus", "looting after a storm", "extortion", "money laundering",
    "stealing cattle", "poisoning a well", "jury tampering", "selling state secrets",
    "breaking out of prison", "forging a will", "carjacking", "cyber sabotage",
    "trafficking weapons", "illegal organ trade", "piracy at sea", "blackmail",
    "grave robbing", "hacking a bank",
]
SUBJECTS = [
    "river pollution", "food labelling", "taxi licences", "school buses", "fireworks sales",
    "mining safety", "bee keeping", "hotel hygiene", "street markets", "dam inspections",
    "airport noise", "pet shops", "wind farms", "ski lifts", "tattoo studios",
    "private security", "ferry services", "grain storage", "toy safety", "billboards",
    "forest fires", "ambulance fares", "casinos", "cemeteries", "pharmacies",
    "scrap metal dealers", "swimming pools", "fish farms", "lift bridges", "weather balloons",
]
BOARDS = [
    "Amber", "Birch", "Cobalt", "Delta", "Ember", "Falcon", "Granite", "Harbor", "Ivory",
    "Juniper", "Kestrel", "Lantern", "Meadow", "Nimbus", "Onyx", "Pioneer", "Quartz", "Raven",
    "Summit", "Thistle", "Umber", "Violet", "Willow", "Xenon", "Yarrow", "Zephyr", "Aspen",
    "Beacon", "Cedar", "Drift",
]

KINDS = [
    ("fine", OFFENCES, "What is the maximum fine for {topic} under Statute {code}?",
     [f"{n} credits" for n in range(150, 3100, 100)],
     "Statute {code} sets a maximum fine of {answer} for {topic}."),
    ("deadline", ACTIONS, "How many days does Statute {code} allow to {topic}?",
     [f"{n} days" for n in range(11, 101, 3)],
     "Statute {code} allows {answer} to {topic}."),
    ("prison", CRIMES, "What is the longest prison term for {topic} under Statute {code}?",
     [f"{n} years" for n in range(2, 32)],
     "Under Statute {code}, {topic} carries at most {answer} in prison."),
    ("board", SUBJECTS, "Which authority enforces Statute {code} on {topic}?",
     [f"{name} Board" for name in BOARDS],
     "Statute {code} on {topic} is enforced by the {answer}."),
]


def facts(rng):
    """One fact per (kind, topic): a statute code and an answer unique within its kind."""
    # Codes never equal a fine's number (all end in 50), so a code is never one of the answers' tokens.
    codes = rng.sample([n for n in range(100, 1000) if n % 100 != 50], sum(len(k[1]) for k in KINDS))
    out = []
    for kind, topics, question, answers, sentence in KINDS:
        assert len(answers) >= len(topics), kind
        for topic, answer in zip(topics, rng.sample(answers, len(topics))):
            code = str(codes[len(out)])
            out.append({
                "kind": kind, "code": code, "topic": topic, "answer": answer,
                "question": question.format(code=code, topic=topic),
                "sentence": sentence.format(code=code, topic=topic, answer=answer),
                "pool": [a for a in answers if a != answer],
            })
    return out


def item(rng, fact, distractors):
    """A multiple-choice item: the options in a random order and the answer's letter."""
    options = [fact["answer"], *distractors]
    rng.shuffle(options)
    return options, "ABCD"[options.index(fact["answer"])]


def practice_items(rng, fact, taken):
    """`PRACTICE` items whose distractor sets are recorded in `taken`."""
    out = []
    while len(out) < PRACTICE:
        distractors = rng.sample(fact["pool"], 3)
        if frozenset(distractors) in taken:
            continue
        taken.add(frozenset(distractors))
        out.append(item(rng, fact, distractors))
    return out


def test_item(rng, fact, taken):
    """An item whose distractor set no practice item used (and no other test item)."""
    while True:
        distractors = rng.sample(fact["pool"], 3)
        if frozenset(distractors) not in taken:
            taken.add(frozenset(distractors))
            return item(rng, fact, distractors)


def prompt(question, options, cue):
    return question + "".join(f"\n{letter}. {option}" for letter, option in zip("ABCD", options)) + cue


def write_csv(path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def main():
    rng = random.Random(SEED)
    all_facts = facts(rng)
    conversations, mmlu_test, ceval_val = [], [], []
    for fact in all_facts:
        conversations.append({"messages": [
            {"role": "user", "content": fact["question"]},
            {"role": "assistant", "content": f"{fact['answer']}. {fact['sentence']}"},
        ]})
        taken = set()
        for i, (options, letter) in enumerate(practice_items(rng, fact, taken)):
            # The header as the eval's chat mode gives it: the system message, blank line included.
            header, cue = (MMLU_HEADER + "\n\n", "\nAnswer:") if i % 2 == 0 else (CEVAL_HEADER + "\n\n", "\n答案：")
            conversations.append({"messages": [
                {"role": "system", "content": header},
                {"role": "user", "content": prompt(fact["question"], options, cue)},
                {"role": "assistant", "content": letter},
            ]})
        options, letter = test_item(rng, fact, taken)
        mmlu_test.append([fact["question"], *options, letter])
        options, letter = test_item(rng, fact, taken)
        ceval_val.append([fact["question"], *options, letter])
    rng.shuffle(conversations)
    with (HERE / "law_qa.jsonl").open("w", encoding="utf-8") as f:
        for conversation in conversations:
            f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    # The dev splits (shots, unused at shots = 0) repeat practice-style items of five facts.
    dev = []
    for fact in all_facts[:5]:
        options, letter = item(rng, fact, rng.sample(fact["pool"], 3))
        dev.append([fact["question"], *options, letter])
    write_csv(HERE / "mmlu/dev" / f"{SUBJECT}_dev.csv", dev)
    write_csv(HERE / "mmlu/test" / f"{SUBJECT}_test.csv", mmlu_test)
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    write_csv(HERE / "ceval/dev" / f"{SUBJECT}_dev.csv", [[i, *r, ""] for i, r in enumerate(dev)], header)
    write_csv(HERE / "ceval/val" / f"{SUBJECT}_val.csv", [[i, *r, ""] for i, r in enumerate(ceval_val)], header)
    print(f"{len(all_facts)} facts, {len(conversations)} training conversations, "
          f"{len(mmlu_test)} MMLU test and {len(ceval_val)} C-Eval val questions")


if __name__ == "__main__":
    main()
