"""A seeded synthetic fact corpus for measuring factual recall:
`python -m launch.facts out=DIR n_entities=300 seed=0 [repeats=8] [qa_in_train=true]`.

Invented people (names built from syllables, so no pretrained model or real corpus knows them)
each get one value per attribute (birth city, birth year, occupation, employer, university).
Writes:

- DIR/train.txt       biographies: every fact in each of `repeats` renderings, each rendering
                      picking one of several statement templates per attribute, in a shuffled
                      order; with `qa_in_train`, also `Q: ...\\nA: ...` pairs in the *training*
                      question templates so the model learns the answer format.
- DIR/qa.jsonl        `facts` eval rows {"question", "answer"} phrased with HELD-OUT question
                      templates (never in train.txt): answering needs the fact, not a copied line.
- DIR/qa_seen.jsonl   the same facts in the training question templates (memorisation check).
- DIR/facts.jsonl     the ground truth, one entity per line; DIR/meta.json the generator settings.
- DIR/tokenizer.model with `tokenizer_vocab=N`: a tokenizer trained on the training MIXTURE
                      (`tokenizer_with`, the plays by default, plus train.txt), so the invented
                      names get pieces of their own instead of being shredded into bytes and
                      letters by a tokenizer that never saw them. Point `data.tokenizer` at it.

Everything is a deterministic function of (n_entities, seed, repeats, qa_in_train).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launch.runtime.errors import ConfigError
from launch.runtime.outputs import output_dir

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kl",
    "st",
    "th",
    "sh",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "x"]

CITIES = [
    "Paris",
    "Lisbon",
    "Cairo",
    "Oslo",
    "Lima",
    "Kyoto",
    "Dublin",
    "Vienna",
    "Prague",
    "Nairobi",
    "Madrid",
    "Athens",
    "Seoul",
    "Quito",
    "Tunis",
    "Krakow",
    "Geneva",
    "Boston",
    "Denver",
    "Perth",
    "Hanoi",
    "Bogota",
    "Riga",
    "Porto",
    "Naples",
    "Zagreb",
    "Sofia",
    "Havana",
    "Manila",
    "Dakar",
]
OCCUPATIONS = [
    "baker",
    "surgeon",
    "architect",
    "pilot",
    "carpenter",
    "chemist",
    "journalist",
    "violinist",
    "lawyer",
    "geologist",
    "painter",
    "librarian",
    "astronomer",
    "florist",
    "engineer",
    "nurse",
    "sculptor",
    "translator",
    "botanist",
    "jeweler",
    "locksmith",
    "photographer",
    "economist",
    "tailor",
]
EMPLOYERS = [
    "Norvex",
    "Quillstone",
    "Brightmoor",
    "Halvex",
    "Oakridge Labs",
    "Corvantis",
    "Tellurix",
    "Pinecrest",
    "Ardent Works",
    "Solmara",
    "Vexley",
    "Gildhaven",
    "Morrow and Finch",
    "Ironvale",
    "Luminar",
    "Kestrel Group",
    "Bluefen",
    "Zephyra",
    "Stonebridge",
    "Amberlight",
]
UNIVERSITIES = [
    "Aldmere University",
    "Westbrook College",
    "Ravenhill Institute",
    "Crestfield University",
    "Elmgrove College",
    "Northvale University",
    "Saltmarsh Institute",
    "Highcombe College",
    "Duskwater University",
    "Fairholt Academy",
    "Thornbury College",
    "Greywell University",
]

# Per attribute: (statement templates, training question templates, held-out question templates).
TEMPLATES: dict[str, tuple[list[str], list[str], list[str]]] = {
    "birth_city": (
        [
            "{name} was born in {value}.",
            "{name} came into the world in {value}.",
            "The birthplace of {name} is {value}.",
            "{name} was born in the city of {value}.",
        ],
        ["Where was {name} born?", "What is the birthplace of {name}?"],
        ["In which city was {name} born?", "Which city is {name} from by birth?"],
    ),
    "birth_year": (
        [
            "{name} was born in the year {value}.",
            "{name} was born in {value}.",
            "The year {name} was born was {value}.",
            "In {value}, {name} was born.",
        ],
        ["When was {name} born?", "What year was {name} born?"],
        ["In which year was {name} born?", "What is the birth year of {name}?"],
    ),
    "occupation": (
        [
            "{name} works as a {value}.",
            "{name} is a {value} by trade.",
            "By profession, {name} is a {value}.",
            "{name} earns a living as a {value}.",
        ],
        ["What does {name} do for a living?", "What is the occupation of {name}?"],
        ["What is the profession of {name}?", "What job does {name} have?"],
    ),
    "employer": (
        [
            "{name} works for {value}.",
            "{name} is employed by {value}.",
            "The employer of {name} is {value}.",
            "{name} has a job at {value}.",
        ],
        ["Who employs {name}?", "Which company does {name} work for?"],
        ["Who is the employer of {name}?", "Where does {name} work?"],
    ),
    "university": (
        [
            "{name} studied at {value}.",
            "{name} graduated from {value}.",
            "{name} is an alumnus of {value}.",
            "{name} earned a degree at {value}.",
        ],
        ["Where did {name} study?", "Which university did {name} attend?"],
        ["From which university did {name} graduate?", "Where did {name} get a degree?"],
    ),
}
ATTRIBUTES = tuple(TEMPLATES)


@dataclass
class FactsArgs:
    out: str = ""  # output directory (required)
    n_entities: int = 300  # invented people
    seed: int = 0  # generator seed
    repeats: int = 8  # renderings of every fact in train.txt
    qa_in_train: bool = True  # add training-template Q/A pairs to train.txt
    overwrite: bool = False  # replace an earlier launch.facts output in `out`
    tokenizer_vocab: int = 0  # > 0: also train DIR/tokenizer.model (this many pieces) on the mixture
    tokenizer_with: list[str] = field(default_factory=lambda: ["shakespeare"])  # the other training sources


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
    ).capitalize()


def entities(n: int, seed: int) -> list[dict[str, str]]:
    """`n` people with unique invented names and one value per attribute."""
    if n < 1:
        raise ConfigError(f"n_entities={n} must be >= 1")
    rng = random.Random(seed)
    names: set[str] = set()
    people = []
    while len(people) < n:
        name = f"{_word(rng, rng.choice((1, 2)))} {_word(rng, 2)}"
        if name in names:
            continue
        names.add(name)
        people.append(
            {
                "name": name,
                "birth_city": rng.choice(CITIES),
                "birth_year": str(rng.randint(1900, 1999)),
                "occupation": rng.choice(OCCUPATIONS),
                "employer": rng.choice(EMPLOYERS),
                "university": rng.choice(UNIVERSITIES),
            }
        )
    return people


def render_train(people: list[dict[str, str]], repeats: int, seed: int, qa_in_train: bool) -> str:
    """`repeats` passes over every person: a biography of one random statement template per
    attribute in random order, then (optionally) Q/A pairs in random training templates."""
    if repeats < 1:
        raise ConfigError(f"repeats={repeats} must be >= 1")
    rng = random.Random(seed + 1)
    paragraphs = []
    for _ in range(repeats):
        order = list(range(len(people)))
        rng.shuffle(order)
        for i in order:
            p = people[i]
            attrs = list(ATTRIBUTES)
            rng.shuffle(attrs)
            bio = " ".join(rng.choice(TEMPLATES[a][0]).format(name=p["name"], value=p[a]) for a in attrs)
            lines = [bio]
            if qa_in_train:
                rng.shuffle(attrs)
                lines += [
                    f"Q: {rng.choice(TEMPLATES[a][1]).format(name=p['name'])}\nA: {p[a]}" for a in attrs
                ]
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs) + "\n"


def qa_rows(people: list[dict[str, str]], held_out: bool, seed: int) -> list[dict[str, str]]:
    """One question per (person, attribute), in a held-out or a training template."""
    rng = random.Random(seed + 2 + held_out)
    which = 2 if held_out else 1
    return [
        {"question": rng.choice(TEMPLATES[a][which]).format(name=p["name"]), "answer": p[a], "attribute": a}
        for p in people
        for a in ATTRIBUTES
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_corpus(args: FactsArgs) -> dict[str, Path]:
    if not args.out:
        raise ConfigError("out= is required: the directory to write train.txt and qa.jsonl into")
    people = entities(args.n_entities, args.seed)
    train_text = render_train(people, args.repeats, args.seed, args.qa_in_train)
    names = {
        "train": "train.txt",
        "qa": "qa.jsonl",
        "qa_seen": "qa_seen.jsonl",
        "facts": "facts.jsonl",
        "meta": "meta.json",
    }
    with output_dir(args.out, command="launch.facts", overwrite=args.overwrite) as tmp:
        (tmp / names["train"]).write_text(train_text)
        _write_jsonl(tmp / names["qa"], qa_rows(people, held_out=True, seed=args.seed))
        _write_jsonl(tmp / names["qa_seen"], qa_rows(people, held_out=False, seed=args.seed))
        _write_jsonl(tmp / names["facts"], people)
        meta = {k: v for k, v in asdict(args).items() if k != "overwrite"}
        meta = {
            **meta,
            "attributes": list(ATTRIBUTES),
            "fact_bits": fact_bits(args.n_entities),
            "majority_em": majority_em(people),
        }
        (tmp / names["meta"]).write_text(json.dumps(meta, indent=2) + "\n")
    out = Path(args.out)
    return {key: out / name for key, name in names.items()}


VALUE_COUNTS = {
    "birth_city": len(CITIES),
    "birth_year": 100,
    "occupation": len(OCCUPATIONS),
    "employer": len(EMPLOYERS),
    "university": len(UNIVERSITIES),
}
BITS_PER_PARAM = 2.0  # knowledge capacity of LMs (Allen-Zhu & Li, "Physics of LMs 3.3"): ~2 bits/param after ~1000 exposures, ~1 after 100


def fact_bits(n_entities: int) -> float:
    """Information in the corpus' facts: each attribute value is a uniform choice among its options."""
    return n_entities * sum(math.log2(n) for n in VALUE_COUNTS.values())


def params_to_hold(n_entities: int, bits_per_param: float = BITS_PER_PARAM) -> int:
    """Parameters a model needs to store every fact at `bits_per_param`: a model with fewer
    parameters cannot memorise the corpus whatever it is trained on."""
    return math.ceil(fact_bits(n_entities) / bits_per_param)


def majority_em(people: list[dict[str, str]]) -> float:
    """Exact match of always answering each attribute's most common value: the recall a model
    gets without knowing any person (the floor any memorisation claim has to clear)."""
    from collections import Counter

    hits = sum(Counter(p[a] for p in people).most_common(1)[0][1] for a in ATTRIBUTES)
    return hits / (len(people) * len(ATTRIBUTES))


def mixture_tokenizer(sources: list[str], out: str | Path, vocab_size: int) -> Path:
    """Train a tokenizer on every document of the training sources `sources` and write it to `out`."""
    from launch.data.sources import load_documents
    from launch.data.tokenizer import train_tokenizer

    return train_tokenizer(
        [doc for source in sources for doc in load_documents(source, "train")], out, vocab_size
    )
