"""Every format parsed from hand-written fixtures in the public datasets' own schema."""

from pathlib import Path

import pytest

from launch.eval.formats import QA, MultipleChoice, register_format
from launch.eval.tasks import FORMATS, Document, load_examples, parse_task_spec, parse_task_specs, split_shots
from launch.runtime.errors import UserError

from .conftest import FIXTURES


def load(spec: str):
    return load_examples(parse_task_spec(spec))


def test_piqa():
    ex = load(f"piqa:{FIXTURES / 'piqa.jsonl'}")
    assert len(ex) == 4 and all(isinstance(e, MultipleChoice) for e in ex)
    ctx, cont = ex[0].options[0]
    assert ctx == "Question: How do I keep bread from going stale?\nAnswer:"
    assert cont == " Store it in a sealed bag at room temperature."
    assert [e.label for e in ex] == [0, 1, 0, 1]


def test_hellaswag_preprocessing_and_string_labels():
    ex = load(f"hellaswag:{FIXTURES / 'hellaswag.jsonl'}")
    assert [e.label for e in ex] == [3, 0, 0]  # "3", "0" (strings in HF) and 0 (int)
    ctx, cont = ex[1].options[0]
    # activity label prefix, ctx_a + capitalised ctx_b
    assert ctx == "Making a sandwich: A woman lays two slices of bread on a cutting board. She"
    assert cont == " spreads butter on one slice with a knife."
    ctx, cont = ex[2].options[0]
    assert "[" not in ctx and "[" not in cont  # WikiHow markup removed, " [title]" became a sentence break
    assert "How to water a cactus. Check the soil first." in ctx
    assert len(ex[0].options) == 4


def test_boolq():
    ex = load(f"boolq:{FIXTURES / 'boolq.jsonl'}")
    assert [e.label for e in ex] == [1, 0, 1]
    ctx, cont = ex[1].options[1]
    assert ctx.endswith("\nQuestion: can penguins fly?\nAnswer:") and cont == " yes"
    assert ex[1].options[0][1] == " no"


def test_boolq_superglue_label_field(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text('{"question": "q", "passage": "p", "label": 1}\n')
    assert load(f"boolq:{p}")[0].label == 1


def test_arc_answer_keys_letters_and_digits():
    easy = load(f"arc:{FIXTURES / 'arc_easy.jsonl'}")
    assert [e.label for e in easy] == [0, 2, 1]  # "A" of A-D, "C" of A-C, "2" of 1-4
    assert len(easy[1].options) == 3
    assert easy[0].options[0] == (
        "Question: Which of these is needed for a plant to make its own food?\nAnswer:",
        " sunlight",
    )
    challenge = load(f"arc:{FIXTURES / 'arc_challenge.jsonl'}")
    assert [e.label for e in challenge] == [2, 1, 0]  # 5 options; letter key against digit labels
    assert len(challenge[0].options) == 5


def test_openbookqa():
    ex = load(f"openbookqa:{FIXTURES / 'openbookqa.jsonl'}")
    assert [e.label for e in ex] == [3, 1, 0]
    assert ex[0].options[3] == ("The sun is responsible for", " plants sprouting, blooming and wilting")


def test_winogrande_partial_scoring():
    ex = load(f"winogrande:{FIXTURES / 'winogrande.jsonl'}")
    assert [e.label for e in ex] == [0, 0, 1]
    (c1, s1), (c2, s2) = ex[0].options
    assert c1 == "Sarah was a much better surgeon than Maria so Sarah"
    assert c2 == "Sarah was a much better surgeon than Maria so Maria"
    assert s1 == s2 == " always got the harder cases."


def test_generative_formats():
    nq = load(f"nq_open:{FIXTURES / 'nq_open.jsonl'}")
    assert isinstance(nq[0], QA) and nq[1].answers == ["William Shakespeare", "Shakespeare"]
    assert nq[0].prompt() == "Q: what is the capital city of france?\nA:"
    assert nq[0].as_shot() == "Q: what is the capital city of france?\nA: Paris"
    tqa = load(f"triviaqa:{FIXTURES / 'triviaqa.jsonl'}")
    assert (
        tqa[0].answers[0] == "Mars" and "The Red Planet" in tqa[0].answers and "red planet" in tqa[0].answers
    )
    assert tqa[0].prompt() == "Q: Which planet is known as the Red Planet?\nA:"  # no doubled "?"
    facts = load(f"facts:{FIXTURES / 'facts.jsonl'}")
    assert facts[0].answers == ["blue"] and facts[2].answers == ["four", "4"]


def test_text_jsonl_plain_and_builtin():
    docs = load(f"text:{FIXTURES / 'text.jsonl'}")
    assert [type(d) for d in docs] == [Document, Document] and docs[1].text.startswith("HAMLET.")
    plain = load(f"text:{FIXTURES / 'text.txt'}")
    assert len(plain) == 1 and plain[0].text == (FIXTURES / "text.txt").read_text()
    for name in ("shakespeare", "text"):
        spec = parse_task_spec(name)
        assert spec.path is None and spec.name == "shakespeare"
    plays = load_examples(parse_task_spec("shakespeare"))
    assert len(plays) == 4 and all(len(d.text) > 10000 for d in plays)


def test_malformed_rows_name_file_and_line():
    with pytest.raises(UserError, match=r"bad_piqa\.jsonl:2: .*missing field 'sol2'"):
        load(f"piqa:{FIXTURES / 'bad_piqa.jsonl'}")
    with pytest.raises(UserError, match=r"bad_json\.jsonl:2: invalid JSON"):
        load(f"nq_open:{FIXTURES / 'bad_json.jsonl'}")


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}', "exactly one '_'"),
        ('{"sentence": "x _ y", "option1": "a", "option2": "b", "answer": "3"}', 'must be "1" or "2"'),
    ],
)
def test_bad_values_name_line(tmp_path, row, message):
    p = tmp_path / "w.jsonl"
    p.write_text('{"sentence": "x _ y", "option1": "a", "option2": "b", "answer": "2"}\n\n' + row + "\n")
    with pytest.raises(UserError, match=rf"w\.jsonl:3: bad winogrande row: .*{message}"):
        load(f"winogrande:{p}")


def test_task_specs_names_and_errors(tmp_path):
    arc = FIXTURES / "arc_easy.jsonl"
    specs = parse_task_specs(
        [f"arc:{arc}", f"arc:{FIXTURES / 'arc_challenge.jsonl'}", "shakespeare", f"arc:{arc}?name=arc_e"]
    )
    assert [s.name for s in specs] == ["arc", "arc_2", "shakespeare", "arc_e"]
    shots = parse_task_spec(f"nq_open:{FIXTURES / 'nq_open.jsonl'}?shots={FIXTURES / 'nq_open_shots.jsonl'}")
    assert shots.shots_path == FIXTURES / "nq_open_shots.jsonl"
    with pytest.raises(UserError, match="unknown format 'squad'"):
        parse_task_spec("squad:/x.jsonl")
    with pytest.raises(UserError, match="needs a local file"):
        parse_task_spec("piqa")
    with pytest.raises(UserError, match="file not found"):
        parse_task_spec(f"piqa:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(UserError, match="unknown option"):
        parse_task_spec(f"piqa:{FIXTURES / 'piqa.jsonl'}?shot=3")


def test_split_shots_file_or_held_out():
    spec = parse_task_spec(f"nq_open:{FIXTURES / 'nq_open.jsonl'}")
    ex = load_examples(spec)
    shots, rest = split_shots(spec, ex, 1)
    assert shots == ex[:1] and rest == ex[1:]  # held out of scoring
    spec = parse_task_spec(f"nq_open:{FIXTURES / 'nq_open.jsonl'}?shots={FIXTURES / 'nq_open_shots.jsonl'}")
    shots, rest = split_shots(spec, ex, 2)
    assert [s.question for s in shots] == [
        "what colour is grass",
        "how many days are in a week",
    ] and rest == ex
    with pytest.raises(UserError, match="has only 2 rows"):
        split_shots(spec, ex, 3)


def test_adding_a_format_is_one_registered_function(tmp_path):
    @register_format("_test_yesno", "multiple_choice", fields=("q", "a"), structured=("a",))
    def _yesno(row):
        return MultipleChoice([(row["q"], " no"), (row["q"], " yes")], int(row["a"]))

    try:
        p = tmp_path / "t.jsonl"
        p.write_text('{"q": "ok?", "a": 1}\n')
        assert load(f"_test_yesno:{p}")[0].label == 1
    finally:
        FORMATS.pop("_test_yesno")


def test_fixture_files_exist_for_every_format():
    for name in FORMATS:
        assert (Path(FIXTURES) / f"{name}.jsonl").is_file() or name == "arc", name
