"""The new-job flow's form: what a person types and uploads, turned into the same (kind, spec) body the
API takes, and the spec's errors (ValidationFailed.fields, keyed by spec path) put back next to the form
field they are about. The quote step remembers the body server-side under a one-time token, so the
confirm step submits exactly what was quoted, once."""

from __future__ import annotations

import json
import secrets
from decimal import Decimal, InvalidOperation
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.contrib.sessions.backends.base import SessionBase
from django.core.cache import cache

from marketplace.artifacts.services import artifact_store
from marketplace.core.exceptions import ApplicationError
from marketplace.jobs.models import Job
from marketplace.ledger.escrow import price_default
from worker_agent.architectures import REGISTRY

EXAMPLE_CONFIGS = {
    "mlp": {"in_features": 16, "hidden": [32], "out_features": 4},
    "cnn": {"in_channels": 1, "height": 8, "width": 8, "channels": [4], "hidden": 8, "out_features": 5},
}
COMPARE_METHODS = [("allclose", "allclose (within tolerance)"), ("exact", "exact (identical bytes)"),
                   ("top1", "top1 (same predicted class)")]
# (form field, file field) per artifact the spec names, and which kinds name it
ARTIFACTS = {"weights": ("weights_file", None), "dataset": ("dataset_file", Job.Kind.INFERENCE),
             "train_dataset": ("train_dataset_file", Job.Kind.FEDAVG),
             "eval_dataset": ("eval_dataset_file", Job.Kind.FEDAVG)}
SHA_OF = {file_field: name for name, (file_field, _) in ARTIFACTS.items()}
# where a spec error (its key in ValidationFailed.fields) is shown
FIELD_OF = {
    "model": "config", "model.architecture": "architecture", "model.config": "config", "model.weights": "weights_file",
    "dataset": "dataset_file", "train_dataset": "train_dataset_file", "eval_dataset": "eval_dataset_file",
    "compare": "compare_method", "compare.method": "compare_method", "compare.rtol": "rtol", "compare.atol": "atol",
    "price_per_result": "price", "rows_per_unit": "rows_per_unit", "batch_size": "batch_size", "quorum": "quorum",
    "max_results_per_unit": "max_results_per_unit", "rounds": "rounds", "shards": "shards",
    "learning_rate": "learning_rate",
}
QUOTES_KEY = "portal:quotes"
QUOTES_KEPT = 5
CONFIRM_TTL = 24 * 3600


def _number(**attrs: Any) -> forms.NumberInput:
    return forms.NumberInput(attrs={"inputmode": "decimal", **attrs})


class JobForm(forms.Form):
    kind = forms.ChoiceField(choices=Job.Kind.choices, initial=Job.Kind.INFERENCE,
                             help_text="inference: a model over your rows; fedavg: federated training in rounds")
    architecture = forms.ChoiceField(choices=[(name, name) for name in REGISTRY], initial="mlp",
                                     help_text="from the registry the agents ship: no code crosses the network")
    config = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false"}),
                             initial=json.dumps(EXAMPLE_CONFIGS["mlp"]), label="Architecture config (JSON)",
                             help_text='mlp: {"in_features", "hidden": [...], "out_features"}; cnn: {"in_channels", '
                                       '"height", "width", "channels": [...], "hidden", "out_features"}')
    weights_file = forms.FileField(required=False, label="Weights (safetensors)",
                                   help_text="float32 tensors named as the architecture's state_dict")
    weights = forms.CharField(required=False, widget=forms.HiddenInput)
    dataset_file = forms.FileField(required=False, label="Dataset (safetensors)",
                                   help_text="one float32 tensor named x, one row per input")
    dataset = forms.CharField(required=False, widget=forms.HiddenInput)
    train_dataset_file = forms.FileField(required=False, label="Training dataset (safetensors)",
                                         help_text="x (float32 inputs) and y (int64 labels)")
    train_dataset = forms.CharField(required=False, widget=forms.HiddenInput)
    eval_dataset_file = forms.FileField(required=False, label="Evaluation dataset (safetensors)",
                                        help_text="held out: the marketplace scores each round on it")
    eval_dataset = forms.CharField(required=False, widget=forms.HiddenInput)
    rows_per_unit = forms.IntegerField(required=False, min_value=1, initial=256, widget=_number(),
                                       help_text="rows each work unit computes")
    batch_size = forms.IntegerField(required=False, min_value=1, widget=_number(placeholder="64 (fedavg: 32)"),
                                    help_text="empty: the kind's default")
    rounds = forms.IntegerField(required=False, min_value=1, initial=5, widget=_number())
    shards = forms.IntegerField(required=False, min_value=1, initial=4, widget=_number(),
                                help_text="units per round, one per shard of the training data")
    learning_rate = forms.FloatField(required=False, initial=0.05, widget=_number(step="any"))
    quorum = forms.IntegerField(min_value=2, max_value=10, initial=2, widget=_number(),
                                help_text="agreeing results from devices of different owners")
    max_results_per_unit = forms.IntegerField(min_value=2, max_value=20, initial=6, widget=_number(),
                                              help_text="replicas a disputed unit may take; the escrow pays this many")
    compare_method = forms.ChoiceField(choices=COMPARE_METHODS, initial="allclose", label="Comparator",
                                       help_text="how two replicas of a unit must agree")
    rtol = forms.FloatField(required=False, min_value=0, label="Relative tolerance",
                            widget=_number(step="any", placeholder="1e-5 (fedavg: 1e-3)"), help_text="allclose only")
    atol = forms.FloatField(required=False, min_value=0, label="Absolute tolerance",
                            widget=_number(step="any", placeholder="1e-6 (fedavg: 1e-5)"), help_text="allclose only")
    price = forms.DecimalField(min_value=0, decimal_places=settings.IDLEGRID_TOKEN_DECIMALS, label="Price per result",
                               widget=_number(step="any"))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["price"].initial = Decimal(price_default()).scaleb(-settings.IDLEGRID_TOKEN_DECIMALS).normalize()
        self.fields["price"].help_text = f"in {settings.IDLEGRID_TOKEN_SYMBOL}, paid per valid result"

    def validate_as_you_type(self, url: str) -> None:
        """htmx attributes: each option is checked on the server as it changes (job_validate), with the rest
        of the form but never its files (they go up alone, through the upload endpoint)."""
        files = ",".join(file_field for file_field, _ in ARTIFACTS.values())
        for name, field in self.fields.items():
            if isinstance(field.widget, forms.HiddenInput):
                continue
            trigger = ("uploaded" if name.endswith("_file")  # submit.js fires it once the file is stored
                       else "change" if isinstance(field.widget, forms.Select)
                       else "input changed delay:500ms, change")
            field.widget.attrs.update({
                "hx-post": url, "hx-target": f"#id_{name}_status", "hx-swap": "innerHTML", "hx-trigger": trigger,
                "hx-vals": json.dumps({"_field": name}), "hx-params": f"not {files}",
            })

    def clean_config(self) -> dict[str, Any]:
        try:
            config = json.loads(self.cleaned_data["config"])
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(f"not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
        if not isinstance(config, dict):
            raise forms.ValidationError("must be a JSON object, e.g. " + json.dumps(EXAMPLE_CONFIGS["mlp"]))
        return config

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        for name in ARTIFACTS:
            sha = data.get(name) or ""
            if sha and not (len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
                data[name] = ""  # a hidden field someone edited: the spec check would say the same, less kindly
        kind = data.get("kind")
        if kind == Job.Kind.INFERENCE and data.get("rows_per_unit") is None:
            self.add_error("rows_per_unit", "How many rows each unit computes (e.g. 256).")
        if kind == Job.Kind.FEDAVG:
            for name in ("rounds", "shards"):
                if data.get(name) is None:
                    self.add_error(name, "Required for a federated job.")
        return data

    def price_base_units(self) -> int | None:
        price = self.cleaned_data.get("price")
        if price is None:
            return None
        try:
            return int((price * 10**settings.IDLEGRID_TOKEN_DECIMALS).to_integral_exact())
        except InvalidOperation:
            return None

    def artifacts_missing(self, *, stored: bool) -> None:
        """A file not chosen (and not uploaded before), said in words next to its field; `stored` False: the
        form had other errors, so a file it carried was not stored (nothing is, on bad input)."""
        kind = self.cleaned_data.get("kind")
        for name, (file_field, only) in ARTIFACTS.items():
            if (only is not None and only != kind) or self.cleaned_data.get(name) or file_field in self.errors:
                continue
            if not stored and self.files.get(file_field) is not None:
                self.add_error(file_field, "Not stored: the form had errors. Choose the file again once they are "
                                           "fixed (with JavaScript it goes up as soon as you choose it).")
            else:
                self.add_error(file_field, f"Choose a file: {self.fields[file_field].label}.")

    def submission(self) -> tuple[str, dict[str, Any]]:
        """The (kind, spec) an API client would send for what the form holds (cleaned)."""
        data = self.cleaned_data
        kind = data.get("kind") or Job.Kind.INFERENCE
        spec: dict[str, Any] = {"model": {"architecture": data.get("architecture"), "config": data.get("config", {}),
                                          "weights": data.get("weights") or ""}}
        options = ["quorum", "max_results_per_unit", "batch_size"]
        if kind == Job.Kind.FEDAVG:
            spec.update(train_dataset=data.get("train_dataset") or "", eval_dataset=data.get("eval_dataset") or "")
            options += ["rounds", "shards", "learning_rate"]
        else:
            spec["dataset"] = data.get("dataset") or ""
            options.append("rows_per_unit")
        spec.update({key: data[key] for key in options if data.get(key) is not None})
        method = data.get("compare_method")
        if method:
            compare: dict[str, Any] = {"method": method}
            if method == "allclose":
                compare.update({key: data[key] for key in ("rtol", "atol") if data.get(key) is not None})
            spec["compare"] = compare
        if (price := self.price_base_units()) is not None:
            spec["price_per_result"] = str(price)
        return kind, spec

    def spec_errors_show(self, error: ApplicationError) -> None:
        """Put each of the service's field errors next to its form field; the rest above the form."""
        fields = error.fields or {}
        if not fields:
            self.add_error(None, error.message)
        for key, problem in fields.items():
            field = FIELD_OF.get(key)
            if field is None and key.startswith("compare."):
                field = "compare_method"
            if field is not None and field not in self.errors:
                self.add_error(field, str(problem))
            elif field is None:
                self.add_error(None, f"{key}: {problem}" if key not in ("required", "available") else error.message)


def uploads_store(form: JobForm, files: Any, *, user: AbstractBaseUser) -> None:
    """Store the files the form carried (a browser without JavaScript sends them here) as the person's
    artifacts, within their quota; each one's sha256 goes into the form's hidden field of the same name."""
    for name, (file_field, _) in ARTIFACTS.items():
        upload = files.get(file_field)
        if upload is None:
            continue
        try:
            artifact, _ = artifact_store(chunks=upload.chunks(), uploaded_by=user, quota_of=user)
        except ApplicationError as exc:
            form.add_error(file_field, exc.message)
            continue
        form.cleaned_data[name] = artifact.sha256


def field_values(form: JobForm) -> dict[str, Any]:
    """What to fill the form with again (the uploaded files by their sha256): strings, for the session."""
    values = {name: form.data.get(name, "") for name in form.fields if not name.endswith("_file")}
    values.update({name: form.cleaned_data.get(name) or "" for name in ARTIFACTS})
    return values


# --- the quote's one-time token --------------------------------------------------------------------

def quote_remember(session: SessionBase, *, kind: str, spec: dict[str, Any], values: dict[str, Any]) -> str:
    """Keep what was quoted under a new one-time token (the newest QUOTES_KEPT quotes of the session)."""
    token = secrets.token_urlsafe(24)
    quotes = dict(session.get(QUOTES_KEY, {}))
    quotes[token] = {"kind": kind, "spec": spec, "values": values}
    session[QUOTES_KEY] = dict(list(quotes.items())[-QUOTES_KEPT:])
    return token


def quote_recall(session: SessionBase, token: str) -> dict[str, Any] | None:
    return session.get(QUOTES_KEY, {}).get(token) if isinstance(token, str) else None


def quote_forget(session: SessionBase, token: str) -> None:
    quotes = dict(session.get(QUOTES_KEY, {}))
    quotes.pop(token, None)
    session[QUOTES_KEY] = quotes


def confirm_claim(*, user: AbstractBaseUser, token: str) -> tuple[bool, int | None]:
    """Claim a confirm token: (True, None) the first time; (False, job id or None while the first request is
    still submitting) for every later POST of it. The claim is an atomic cache `add` (Redis, database and
    memory caches; the file cache checks then writes, a window of a few microseconds), so two POSTs of one
    confirm create one job."""
    key = _confirm_key(user, token)
    if cache.add(key, 0, CONFIRM_TTL):
        return True, None
    return False, cache.get(key) or None


def confirm_done(*, user: AbstractBaseUser, token: str, job_id: int | None) -> None:
    """The job the token created, or (None) release the token after a refusal so the person can retry."""
    key = _confirm_key(user, token)
    if job_id is None:
        cache.delete(key)
    else:
        cache.set(key, job_id, CONFIRM_TTL)


def _confirm_key(user: AbstractBaseUser, token: str) -> str:
    return f"portal:confirm:{user.pk}:{token[:64]}"
