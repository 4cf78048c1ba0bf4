"""Patient photographs stored as DICOM: read the pixels, de-identify the header, write the result.

Supported input: single-frame VL Photographic Image Storage (1.2.840.10008.5.1.4.1.1.77.1.4) and
Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7); Implicit/Explicit VR Little Endian or
JPEG Baseline (1.2.840.10008.1.2.4.50); 8-bit RGB (planar configuration 0 or 1), YBR_FULL /
YBR_FULL_422 (converted to RGB) or MONOCHROME2 (repeated to RGB).  The other VL classes are left
out: each brings modules of its own (endoscopy, microscopy slide coordinates, ophthalmic
multi-frame).  Anything else, a truncated file or one without pixel data is a :class:`DicomError`
naming the file and the problem.

Header de-identification (:class:`HeaderDeidentifier`) is DICOM PS3.15 Annex E's Basic Application
Level Confidentiality Profile as implemented by dicognito's ``Anonymizer``, not a hand-written
table.  Why dicognito rather than pydicom's ``deid``: ``deid`` is a recipe engine (its actions come
from recipe files, in effect a tag list to keep up to date), its stock recipe removes UIDs
(``REMOVE contains:UID``) and its UID functions draw a fresh uuid per call, so keeping two images of
one study linked needs code of one's own.  dicognito replaces every instance UID, name, ID and date
with a value derived from the original through MD5 keyed with a random per-``Anonymizer`` secret:
all files of one run stay linked (one study keeps one new Study Instance UID) and nothing links two
runs.  What dicognito 0.19 does, read from its source:

* UIDs: every UI value except ``*ClassUID`` and Transfer Syntax UID is replaced ("2." + digits).
* PN (all person names): replaced by generated names; IDs (Patient ID, Other Patient IDs,
  Accession Number, Study ID, Station Name, order/procedure-step IDs): replaced by generated IDs;
  Institution Name/Address, Department, patient address: replaced by generated ones.
* Dates: every DA and DT value, and the TM paired with a DA (StudyDate -> StudyTime, ...), is
  shifted back by one offset per run, a random 62..730 days (counted in hours).  Dates are modified,
  not removed: that is PS3.15's Retain Longitudinal Temporal Information with Modified Dates Option
  (code 113107), so it is recorded as applied, with Longitudinal Temporal Information Modified
  (0028,0303) = MODIFIED.
* It leaves free text and patient characteristics alone.  So before it runs, every private
  attribute is removed (the profile removes them; no Retain Safe Private Option), and
  ``RESIDUAL_BASIC_PROFILE`` removes the Basic Profile's "X" attributes that dicognito leaves or
  replaces where the profile removes (descriptions, comments, age, size, weight, other names and
  IDs, device serial number, ...) and empties Patient's Sex (action Z; Type 2).

Attributes this module sets on the output:

* Patient Identity Removed (0012,0062) = YES, as PS3.15 E.1.1 requires of the profile.
* De-identification Method (0012,0063): ``method_description`` (this tool and dicognito's version),
  then the profile's and each applied option's name (LO: values of at most 64 characters).
* De-identification Method Code Sequence (0012,0064), scheme DCM: 113100 Basic Application
  Confidentiality Profile; 113107 Retain Longitudinal Temporal Information Modified Dates Option;
  113102 Clean Recognizable Visual Features Option only when the faces were cleaned.
* Recognizable Visual Features (0028,0302): NO when the faces were cleaned, else the input's value,
  or YES when it has none (a patient photograph shows the patient).
* Burned In Annotation (0028,0301): kept as the input states it, never written by us.  We do not
  detect text in pixels (no 113101 Clean Pixel Data Option), so writing NO would claim a check never
  made; an input stating YES is refused (a :class:`DicomError`), since its pixels carry text that may
  name the patient and that we would pass on.  Absent stays absent: "not stated", as in the input.

Output (:func:`write_photo`): the same SOP Class, uncompressed Explicit VR Little Endian, 8-bit RGB
interleaved (MONOCHROME2 stays MONOCHROME2).  A JPEG input is written uncompressed: a second lossy
encoding would add loss to the de-identified image; Lossy Image Compression stays "01" (the pixels
did go through JPEG once).  No jax or torch here: the JAX de-identifier and the PyTorch eval bridge
both use this module.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
from dicognito import __version__ as DICOGNITO_VERSION
from dicognito.anonymizer import Anonymizer
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from mema_jax.errors import InputError
from mema_jax.fileio import atomic_file

VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SUPPORTED_SOP_CLASSES = {VL_PHOTOGRAPHIC: "VL Photographic Image Storage",
                         SECONDARY_CAPTURE: "Secondary Capture Image Storage"}
SUPPORTED_TRANSFER_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGBaseline8Bit)
SUPPORTED_PHOTOMETRIC = {"RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3, "MONOCHROME2": 1}

# Basic Profile attributes (PS3.15 Table E.1-1, action X or X/Z/D) that dicognito 0.19 leaves, or
# replaces where the profile removes them: removed wherever they occur, sequences included.
RESIDUAL_BASIC_PROFILE = tuple("""
    StudyDescription SeriesDescription ImageComments PatientComments AdditionalPatientHistory
    DerivationDescription ProtocolName PerformedProcedureStepDescription RequestedProcedureDescription
    ScheduledProcedureStepDescription ReasonForTheRequestedProcedure AdmittingDiagnosesDescription
    AcquisitionComments VisitComments CommentsOnThePerformedProcedureStep FrameComments StudyComments
    IdentifyingComments PatientAge PatientSize PatientWeight EthnicGroup PatientBirthTime SmokingStatus
    PregnancyStatus MedicalAlerts Allergies SpecialNeeds PatientState LastMenstrualDate PatientSexNeutered
    PatientInstitutionResidence ReferringPhysicianAddress ReferringPhysicianTelephoneNumbers PersonAddress
    PersonTelephoneNumbers OtherPatientNames PatientBirthName PatientMotherBirthName PerformingPhysicianName
    NameOfPhysiciansReadingStudy PhysiciansOfRecord RequestingPhysician OtherPatientIDs OtherPatientIDsSequence
    AdmissionID PerformedProcedureStepID RequestedProcedureID ScheduledProcedureStepID DeviceSerialNumber
    InstitutionCodeSequence OperatorIdentificationSequence PerformingPhysicianIdentificationSequence
    ReferringPhysicianIdentificationSequence PhysiciansOfRecordIdentificationSequence
    PhysiciansReadingStudyIdentificationSequence RequestAttributesSequence ContentSequence
""".split())
# Basic Profile "Z" attributes dicognito leaves: emptied (Type 2 in the Patient module).
RESIDUAL_EMPTIED = ("PatientSex",)

BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
CLEAN_VISUAL_FEATURES = ("113102", "Clean Recognizable Visual Features Option")
DEFAULT_METHOD = f"MeMa-JAX photos.dicom, dicognito {DICOGNITO_VERSION}"


class DicomError(InputError):
    """A DICOM file this module cannot use; the message names the file and the problem."""


def is_dicom(path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file: b"DICM" after the 128-byte preamble (any name)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


@dataclasses.dataclass
class DicomPhoto:
    path: Path
    dataset: pydicom.Dataset  # the header as read (its pixel data may still be in it)
    pixels: np.ndarray  # uint8 (H, W, 3) RGB: what the face code works on


class _ReadRecorder(io.BytesIO):
    """A file in memory that records short reads.  pydicom stops quietly at the end of a file, so a
    truncated one reads as a shorter dataset; a whole file gives exactly one short read (the empty
    read after its last element), a truncated one a partial read or more than one."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.short_reads: list[int] = []

    def read(self, size=-1, /):
        data = super().read(size)
        if size is not None and size > 0 and len(data) < size:
            self.short_reads.append(len(data))
        return data

    @property
    def truncated(self) -> bool:
        return len(self.short_reads) > 1 or any(self.short_reads)


def read_photo(path) -> DicomPhoto:
    """Reads a supported DICOM photograph; its pixels as uint8 (H, W, 3) RGB."""
    path = Path(path)

    def fail(problem: str):
        raise DicomError(f"{path}: {problem}")

    if not path.is_file():
        fail("no such file")
    if not is_dicom(path):
        fail('not a DICOM file (no "DICM" marker at byte 128)')
    source = _ReadRecorder(path.read_bytes())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about damage; it is reported below
            ds = pydicom.dcmread(source)
    except Exception as e:  # noqa: BLE001 - pydicom raises many kinds on damaged files
        fail(f"unreadable DICOM ({type(e).__name__}: {e})")
    if source.truncated:
        fail("truncated DICOM file (it ends inside a data element)")
    ds.filename, ds.buffer = str(path), None  # name the file in later messages; drop the in-memory copy
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    if not sop_class:
        fail("no SOP Class UID (0008,0016)")
    if sop_class not in SUPPORTED_SOP_CLASSES:
        fail(f"unsupported SOP class {sop_class} ({pydicom.uid.UID(sop_class).name}); supported: "
             + ", ".join(SUPPORTED_SOP_CLASSES.values()))
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        fail(f"unsupported transfer syntax {syntax} ({pydicom.uid.UID(syntax or '').name or 'none'}); supported: "
             "Implicit/Explicit VR Little Endian, JPEG Baseline")
    if "PixelData" not in ds:
        fail("no Pixel Data (7FE0,0010)")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1:
        fail(f"multi-frame image ({frames} frames); only single-frame photographs are supported")
    photometric = ds.get("PhotometricInterpretation", "")
    if photometric not in SUPPORTED_PHOTOMETRIC:
        fail(f"unsupported Photometric Interpretation {photometric!r}; supported: " + ", ".join(SUPPORTED_PHOTOMETRIC))
    for keyword, wanted in (("BitsAllocated", 8), ("BitsStored", 8), ("PixelRepresentation", 0),
                            ("SamplesPerPixel", SUPPORTED_PHOTOMETRIC[photometric])):
        if ds.get(keyword) != wanted:
            fail(f"{keyword} is {ds.get(keyword)}, expected {wanted} (only 8-bit unsigned {photometric} is supported)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels, meta = get_decoder(syntax).as_array(ds, as_rgb=True)
    except Exception as e:  # noqa: BLE001
        fail(f"pixel data cannot be decoded ({type(e).__name__}: {e})")
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    elif meta.get("photometric_interpretation") != "RGB":
        fail(f"pixel data decoded as {meta.get('photometric_interpretation')}, not RGB")
    if pixels.shape != (ds.Rows, ds.Columns, 3) or pixels.dtype != np.uint8:
        fail(f"pixel data decoded to {pixels.shape} {pixels.dtype}, expected ({ds.Rows}, {ds.Columns}, 3) uint8")
    return DicomPhoto(path=path, dataset=ds, pixels=np.ascontiguousarray(pixels))


def _code_item(code: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodeMeaning = code
    item.CodingSchemeDesignator = "DCM"
    return item


def _strip_residual(dataset: Dataset, element) -> None:
    """``Dataset.walk`` callback: the Basic Profile actions dicognito does not take."""
    if element.keyword in RESIDUAL_BASIC_PROFILE:
        del dataset[element.tag]
    elif element.keyword in RESIDUAL_EMPTIED:
        element.value = None


class HeaderDeidentifier:
    """One per run: UIDs replaced consistently within the run (the same input UID -> the same output
    UID across all files of the run, e.g. two images of one study keep sharing a new StudyInstanceUID),
    and one date offset for the run.  A new instance draws a new secret: nothing links two runs."""

    def __init__(self, method_description: str = DEFAULT_METHOD):
        if not method_description or len(method_description) > 64 or "\\" in method_description:
            raise ValueError(f"method_description must be 1..64 characters without '\\' (an LO value): "
                             f"{method_description!r}")
        self.method_description = method_description
        self._anonymizer = Anonymizer()  # no seed: a random secret for this run

    def deidentify(self, dataset: Dataset, *, faces_cleaned: bool) -> Dataset:
        """A de-identified copy of ``dataset`` (which is not modified); see the module docstring."""
        name = getattr(dataset, "filename", None) or "<dataset>"
        if dataset.get("BurnedInAnnotation") == "YES":
            raise DicomError(f"{name}: Burned In Annotation (0028,0301) is YES: text in the pixels may identify "
                             "the patient and this tool does not remove it")
        ds = copy.deepcopy(dataset)
        # Before dicognito: its handlers would parse private values, and it picks a generated name's
        # sex from Patient's Sex, which the profile empties.
        ds.remove_private_tags()
        ds.walk(_strip_residual)
        try:
            self._anonymizer.anonymize(ds)
        except Exception as e:  # noqa: BLE001 - e.g. a malformed date dicognito cannot shift
            raise DicomError(f"{name}: header cannot be de-identified ({type(e).__name__}: {e})") from e
        codes = [BASIC_PROFILE, MODIFIED_DATES] + ([CLEAN_VISUAL_FEATURES] if faces_cleaned else [])
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [self.method_description] + [meaning for _, meaning in codes]
        ds.DeidentificationMethodCodeSequence = [_code_item(code) for code in codes]
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        ds.RecognizableVisualFeatures = "NO" if faces_cleaned else ds.get("RecognizableVisualFeatures") or "YES"
        return ds


def recovered_header(dataset: Dataset) -> Dataset:
    """The header of a recovered photo: the de-identified header (names, IDs, dates and UIDs stay
    replaced: recovery restores the face pixels only), as a new instance (a new SOP Instance UID)
    whose pixels show the face again: Recognizable Visual Features YES and no Clean Recognizable
    Visual Features Option (113102) claimed."""
    ds = copy.deepcopy(dataset)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.RecognizableVisualFeatures = "YES"
    codes = [item for item in ds.get("DeidentificationMethodCodeSequence", []) if item.CodeValue != CLEAN_VISUAL_FEATURES[0]]
    ds.DeidentificationMethodCodeSequence = codes
    method = ds.get("DeidentificationMethod", [])
    method = [method] if isinstance(method, str) else list(method)
    ds.DeidentificationMethod = [v for v in method if v != CLEAN_VISUAL_FEATURES[1]] or [DEFAULT_METHOD]
    return ds


def write_photo(dataset: Dataset, pixels: np.ndarray, out_path) -> None:
    """Writes ``dataset`` (already de-identified) with ``pixels`` (uint8 (H, W, 3) RGB) as its image.

    Same SOP Class UID; uncompressed Explicit VR Little Endian (a JPEG input is written uncompressed:
    no second lossy step); RGB, 3 samples, planar configuration 0, 8 bits; Rows/Columns from
    ``pixels``.  A MONOCHROME2 input stays MONOCHROME2 (the mean of the channels, rounded).  New file
    meta (Media Storage SOP Instance UID = SOP Instance UID, a zero preamble).  Written atomically;
    never onto the file the dataset was read from.
    """
    out_path = Path(out_path)
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 (H, W, 3) RGB, got {pixels.dtype} {pixels.shape}")
    source = getattr(dataset, "filename", None)
    if (isinstance(source, (str, os.PathLike)) and out_path.exists() and Path(source).exists()
            and os.path.samefile(source, out_path)):
        raise DicomError(f"{out_path}: is the input file; an output never overwrites its input")
    ds = copy.deepcopy(dataset)
    input_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    for keyword in ("PixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "NumberOfFrames",
                    "PlanarConfiguration", "SmallestImagePixelValue", "LargestImagePixelValue"):
        ds.pop(keyword, None)
    if ds.get("PhotometricInterpretation") == "MONOCHROME2":
        pixels = np.rint(pixels.mean(axis=2)).astype(np.uint8)
        ds.SamplesPerPixel = 1
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if input_syntax == JPEGBaseline8Bit and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    data = np.ascontiguousarray(pixels).tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)  # values have even length
    ds["PixelData"].VR = "OB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    with atomic_file(out_path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
