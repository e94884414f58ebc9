"""Tables in: the AD and brain-age CSV tables read and validated, so a bad cell stops the run with its line and column.

A table is refused, in one line naming the file, line, subject or column, when it cannot be what it
claims: a delimiter other than a comma, a column name given twice, a quote that never closes, a
Subject that is not a plain file name where it names an image, a value no subject can have (a
negative biomarker, an age of 300, an APOE4 count of 3, a number beyond 1e6). ADNI's codes -4 and
-1 in an attribute cell mean "missing": they are read as empty cells, with a warning per column.
The images a table names are found here (`<image dir>/<Subject>.nii.gz`, else `.nii`); reading
them is data.py's job.
"""
import csv
import hashlib
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from safeio import UserError, file_sha256, warn
from tabular import AD_ATTRIBUTES, AD_CONTINUOUS, SEX_CODES, is_missing_code, parse_attribute, parse_value

CLASS_NAMES = ("CN", "MCI", "AD")
GROUP_ALIASES = {"CN": "CN", "MCI": "MCI", "EMCI": "MCI", "LMCI": "MCI", "AD": "AD", "DEMENTIA": "AD"}
IMAGE_SUFFIXES = (".nii.gz", ".nii")


# ----------------------------------------------------------------------------------------------
# Reading a CSV with validation

def table_sha256(csv_path):
    """The table's identity: sha256 of its bytes (stored in checkpoints, so a run is tied to its data)."""
    return file_sha256(csv_path)


def _check_delimiter(csv_path, header):
    """A header with more semicolons or tabs than commas is a table saved with another delimiter."""
    counts = {",": header.count(","), ";": header.count(";"), "\t": header.count("\t")}
    other = max((";", "\t"), key=counts.get)
    if counts[other] > counts[","]:
        name = "semicolon" if other == ";" else "tab"
        raise UserError(f"{csv_path}: the delimiter looks like a {name} ({counts[other]} {name}s, {counts[',']} "
                        f"commas in the header line): save the table comma-separated")


class _CountedLines:
    """A file's lines with a count of those read, so each row's first and last line are known exactly."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def __iter__(self):
        return self

    def __next__(self):
        line = next(self.f)
        self.n += 1
        return line


def read_csv_rows(csv_path, required):
    """-> (list of (line number, row dict), fieldnames). Checks the delimiter, columns (present, not
    repeated), quotes (a cell spanning lines is a quote never closed), field counts and encoding."""
    if not os.path.isfile(csv_path):
        raise UserError(f"{csv_path}: table not found")
    rows = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            lines = _CountedLines(f)
            reader = csv.reader(lines)
            header = next(reader, None)
            if header is None:
                raise UserError(f"{csv_path}: empty file, no header line")
            fields = [c.strip() for c in header]
            _check_delimiter(csv_path, ",".join(fields))
            seen = {}
            for k, c in enumerate(fields):
                if c and c in seen:
                    raise UserError(f"{csv_path}: column {c} appears twice in the header (columns {seen[c] + 1} "
                                    f"and {k + 1}): rename or remove one")
                seen[c] = k
            missing = [c for c in required if c not in fields]
            if missing:
                raise UserError(f"{csv_path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
            while True:
                start = lines.n + 1
                cells = next(reader, None)
                if cells is None:
                    break
                multi = next((j for j, v in enumerate(cells) if "\n" in v or "\r" in v), None)
                if multi is not None:
                    col = fields[multi] if multi < len(fields) else "(beyond the header)"
                    raise UserError(f"{csv_path} line {start}: a quote opened in column {col} is not closed "
                                    f"before line {lines.n} (cells cannot span lines)")
                if len(cells) > len(fields):
                    raise UserError(f"{csv_path} line {start}: {len(cells)} fields, the header has {len(fields)}")
                row = {k: v.strip() for k, v in zip(fields, cells + [""] * (len(fields) - len(cells)))}
                if any(row.values()):                                  # skip blank lines; short rows: empty cells
                    rows.append((start, row))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{csv_path}: not a readable UTF-8 CSV table ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise UserError(f"{csv_path}: no data rows")
    return rows, fields


def plain_file_name(name):
    """True when `name` can be used as a file name inside a folder: no path separator, not '.' or '..'."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") and \
        os.path.basename(name) == name


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def output_names(ids):
    """A file name for each id (a Subject, for the files a command writes per subject), all inside the
    folder they are joined to and distinct even on a case-insensitive file system: an id of letters,
    digits and . _ - (not starting with . or -, at most 100 characters) is its own name; any other id
    (`../../x`, `a/b`, spaces, `=HYPERLINK(...)`), and an id equal but for case to an earlier one,
    is mapped to its characters outside that set replaced by _ plus `-` and 8 hex digits of its
    sha1 (`../../x` -> `_.._x-9bdbf20b`), numbered on in the (never seen) case of a clash."""
    names, used = [], set()
    for s in ids:
        name = s if _SAFE_NAME.fullmatch(s) else None
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", s)[:64].lstrip(".-") or "subject"
        tag, k = hashlib.sha1(s.encode()).hexdigest()[:8], 0
        while name is None or name.lower() in used:
            name, k = f"{stem}-{tag}" + (f"-{k}" if k else ""), k + 1
        used.add(name.lower())
        names.append(name)
    return names


def check_subjects(csv_path, rows, as_file_names=False):
    """-> the Subject of every row: filled, unique and, where it names a file, a plain file name of at most
    200 bytes that no earlier subject's equals but for case (on a case-insensitive file system they are
    one file)."""
    subjects, seen, folded = [], {}, {}
    for line, row in rows:
        s = row.get("Subject", "")
        if not s:
            raise UserError(f"{csv_path} line {line}: empty Subject")
        if s in seen:
            raise UserError(f"{csv_path} line {line}: subject {s} repeats line {seen[s]}")
        if as_file_names and not plain_file_name(s):
            raise UserError(f"{csv_path} line {line}: Subject {s!r} is not a plain file name (it names the "
                            f"subject's image file, so it may not hold / or \\ or be . or ..)")
        if as_file_names and len(s.encode()) > 200:    # + `.nii.gz` + the atomic write's `.tmp-` prefix < 255
            raise UserError(f"{csv_path} line {line}: Subject {s[:40]}... is {len(s.encode())} bytes long: as a "
                            f"file name it may have at most 200")
        if as_file_names and s.casefold() in folded:
            other = folded[s.casefold()]
            raise UserError(f"{csv_path} line {line}: Subject {s} differs from subject {other[1]} (line "
                            f"{other[0]}) only in case: as file names they are one file on a case-insensitive "
                            f"file system; rename one")
        seen[s] = line
        folded[s.casefold()] = (line, s)
        subjects.append(s)
    return subjects


def find_image(folder, subject):
    """<folder>/<subject>.nii.gz, else <folder>/<subject>.nii -> the path, or None when neither exists."""
    for suffix in IMAGE_SUFFIXES:
        p = os.path.join(folder, subject + suffix)
        if os.path.isfile(p):
            return p
    return None


def _image_paths(csv_path, rows, fields, subjects, image_dir, need):
    """Image path per subject: the `image` column (relative to the CSV) or <image_dir>/<Subject>.nii[.gz]."""
    if not need:
        return None
    base = os.path.dirname(os.path.abspath(csv_path))
    if image_dir is not None and not os.path.isdir(image_dir):
        raise UserError(f"--image-dir {image_dir}: folder not found")
    image_dir = image_dir if image_dir is not None else os.path.join(base, "images")
    paths, seen = [], {}
    for (line, row), subj in zip(rows, subjects):
        if "image" in fields and row.get("image"):
            p = os.path.join(base, row["image"])
            if not os.path.isfile(p):
                raise UserError(f"{csv_path} line {line}: subject {subj}: image file not found: {p}")
        else:
            if not plain_file_name(subj):
                raise UserError(f"{csv_path} line {line}: Subject {subj!r} is not a plain file name, so it cannot "
                                f"name an image in {image_dir} (give the path in an `image` column)")
            p = find_image(image_dir, subj)
            if p is None:
                raise UserError(f"{csv_path} line {line}: subject {subj}: image file not found: "
                                f"{os.path.join(image_dir, subj)}.nii.gz (or .nii)")
        st = os.stat(p)     # one file, whatever the spelling: a symlink, a hard link, a case-insensitive system
        other = seen.setdefault((st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(p), (subj, line))
        if other != (subj, line):   # one scan under two subjects could sit in training and test at once
            raise UserError(f"{csv_path} line {line}: subject {subj}: image {p} is also subject {other[0]}'s "
                            f"(line {other[1]})")
        paths.append(p)
    return paths


def number_cell(csv_path, line, row, col, required, codes=None):
    """A numeric cell, validated: AD attributes by tabular.parse_attribute (range, ADNI missing codes, counted
    in `codes`), others (brain age's Age) as a number within 0-120 when the column is an age."""
    where = f"{csv_path} line {line}: subject {row.get('Subject')}: column {col}"
    try:
        if col in AD_CONTINUOUS:
            if codes is not None and is_missing_code(row.get(col, "")):
                codes[col] = codes.get(col, 0) + 1
            v = parse_attribute(col, row.get(col, ""))
        else:
            v = parse_value(row.get(col, ""))
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None
    if required and math.isnan(v):
        raise UserError(f"{where} is empty")
    if col == "Age" and not math.isnan(v) and not 0 <= v <= 120:
        raise UserError(f"{where}: implausible age {row.get(col)!r} (expected 0-120 years)")
    return v


# ----------------------------------------------------------------------------------------------
# The AD table (Sec. 4.3.1, 4.3.3)

@dataclass
class ADTable:
    """The AD cohort as read from the CSV. `raw` rows feed TabularPreprocessor."""
    subjects: list
    labels: np.ndarray      # (N,) int64, index into class_names; -1 = no diagnosis (prediction tables only)
    raw: list               # (N,) dicts attribute -> cell text, for AD_ATTRIBUTES
    sex: np.ndarray         # (N,) int64, 0 = male, 1 = female, -1 = unknown (empty cell)
    age: np.ndarray         # (N,) float32, NaN = unknown (empty cell)
    image_paths: list       # (N,) str, or None when need_images=False
    csv_path: str
    class_names: tuple = CLASS_NAMES
    skipped: dict = None    # {Group value: rows skipped}, "" for an empty Group
    missing_codes: dict = None  # {attribute: cells holding ADNI's -4 / -1, read as missing}


def parse_group_map(pairs):
    """--group-map SMC=CN X=AD -> {"SMC": "CN", "X": "AD"} (keys upper-case; targets must be diagnoses)."""
    out = {}
    for p in pairs or ():
        key, sep, value = p.partition("=")
        target = GROUP_ALIASES.get(value.strip().upper())
        if not sep or not key.strip() or target is None:
            raise UserError(f"--group-map {p}: expected VALUE=DIAGNOSIS with DIAGNOSIS one of CN, MCI, AD")
        out[key.strip().upper()] = target
    return out


def diagnosis(group, group_map=None):
    """A Group cell -> "CN", "MCI", "AD" or None (unknown or empty): --group-map first, then the aliases."""
    g = group.strip().upper()
    return (group_map or {}).get(g) or GROUP_ALIASES.get(g)


def read_ad_table(csv_path, image_dir=None, need_images=True, classes=3, group_map=None, for_prediction=False):
    """Read and validate an ADNIMERGE-like AD table (SPEC Sec. 3, paper Sec. 4.3.1, 4.3.3).

    Only Subject and Group must be filled: any attribute cell may be empty (imputed, Sec. 3.3), AGE
    and PTGENDER included. Rows whose Group is empty or not a diagnosis (ADNI's SMC, say) are
    skipped and counted in `skipped`, unless --group-map names them; with classes=2 the MCI rows are
    left out. for_prediction: Group is optional and no row is left out (label -1 where unknown).
    ADNI's missing-value codes -4 and -1 read as empty cells, with one warning per column.
    Line numbers in errors are CSV line numbers (the header is line 1).
    """
    if classes not in (2, 3):
        raise UserError(f"classes must be 2 (CN vs AD) or 3, got {classes}")
    names = CLASS_NAMES if classes == 3 else ("CN", "AD")
    required = ("Subject",) + (() if for_prediction else ("Group",)) + AD_ATTRIBUTES
    rows, fields = read_csv_rows(csv_path, required)
    keep, labels, sexes, ages, skipped, codes = [], [], [], [], {}, {}
    for line, row in rows:
        g = diagnosis(row.get("Group", ""), group_map)
        if g is None and not for_prediction:
            skipped[row["Group"]] = skipped.get(row["Group"], 0) + 1
            continue
        cell = row["PTGENDER"]
        if is_missing_code(cell):
            codes["PTGENDER"] = codes.get("PTGENDER", 0) + 1
            cell = ""
        sx = SEX_CODES.get(cell.lower(), -1 if not cell else None)
        if sx is None:
            raise UserError(f"{csv_path} line {line}: subject {row['Subject']}: column PTGENDER: "
                            f"expected Male or Female, got {cell!r}")
        age = number_cell(csv_path, line, row, "AGE", required=False, codes=codes)
        for col in AD_CONTINUOUS[1:]:   # validated now, parsed by the preprocessor
            number_cell(csv_path, line, row, col, required=False, codes=codes)
        if classes == 2 and g == "MCI" and not for_prediction:
            continue
        keep.append((line, row))
        labels.append(names.index(g) if g in names else -1)
        sexes.append(sx)
        ages.append(age)
    if not keep:
        seen = ", ".join(f"{k or '(empty)'} {n}" for k, n in skipped.items())
        raise UserError(f"{csv_path}: no {' or '.join(names)} subjects" + (f" (Group values: {seen}; "
                        f"map them with --group-map VALUE=CN|MCI|AD)" if seen else ""))
    for col in AD_ATTRIBUTES:
        if codes.get(col):
            cells = f"{codes[col]} cell{'s hold' if codes[col] > 1 else ' holds'}"
            warn(f"{csv_path}: column {col}: {cells} ADNI's missing-value code -4 or -1, read as missing")
    subjects = check_subjects(csv_path, keep)
    paths = _image_paths(csv_path, keep, fields, subjects, image_dir, need_images)
    raw = [{a: row[a] for a in AD_ATTRIBUTES} for _, row in keep]
    return ADTable(subjects, np.array(labels, np.int64), raw, np.array(sexes, np.int64),
                   np.array(ages, np.float32), paths, os.fspath(csv_path), names, skipped, codes)


def skipped_summary(table):
    """'' or a line saying which Group values were skipped, for the scripts to print."""
    if not table.skipped:
        return ""
    n = sum(table.skipped.values())
    return (f"{table.csv_path}: skipped {n} row{'s' * (n > 1)} whose Group is not CN, MCI or AD: "
            + ", ".join(f"{k or '(empty)'} {v}" for k, v in sorted(table.skipped.items()))
            + " (map them with --group-map VALUE=CN|MCI|AD)")


# ----------------------------------------------------------------------------------------------
# The brain-age table (Sec. 4.2.1)

@dataclass
class BrainAgeTable:
    subjects: list
    age: np.ndarray         # (N,) float32, years
    sex: np.ndarray         # (N,) int64, 0 = male, 1 = female
    image_paths: list       # (N,) str, or None
    csv_path: str


def read_brain_age_table(csv_path, image_dir=None, need_images=True, for_prediction=False):
    """Read and validate a brain-age table: Subject, Age, Sex (M/F) [, image] (Sec. 4.2.1).
    for_prediction: Age is optional (NaN where absent or empty); Sex, which conditions the model, is not."""
    rows, fields = read_csv_rows(csv_path, ("Subject", "Sex") if for_prediction else ("Subject", "Age", "Sex"))
    ages, sexes = [], []
    for line, row in rows:
        ages.append(number_cell(csv_path, line, row, "Age", required=not for_prediction))
        sx = SEX_CODES.get(row["Sex"].lower())
        if sx is None:
            raise UserError(f"{csv_path} line {line}: subject {row['Subject']}: column Sex: "
                            f"expected M or F, got {row['Sex']!r}")
        sexes.append(sx)
    subjects = check_subjects(csv_path, rows)
    paths = _image_paths(csv_path, rows, fields, subjects, image_dir, need_images)
    return BrainAgeTable(subjects, np.array(ages, np.float32), np.array(sexes, np.int64), paths, os.fspath(csv_path))
