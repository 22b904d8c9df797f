"""ImplicitKernelRegistration: the 3D Slicer module (Slicer 5.10+, Python 3.12).

The widget only binds the UI to a parameter node; the logic converts MRML nodes to library types
(through ImplicitKernelRegistrationLib.slicer_bridge) and calls the library. No algorithm lives here.
Torch is imported only inside the logic, after the requirement check, never at module import.
"""

import importlib.util
import logging
import pathlib
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import (
    vtkMRMLGridTransformNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLModelNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ImplicitKernelRegistrationLib import slicer_bridge
from ImplicitKernelRegistrationLib.errors import IkrError
from ImplicitKernelRegistrationLib.geometry import Image, lps_ras

# Python module name -> pip requirement; torch is installed through the PyTorch extension when present.
TORCH_REQUIREMENT = ">=2.4,<3"
REQUIREMENTS = {
    "torch": "torch" + TORCH_REQUIREMENT,
    "scipy": "scipy>=1.11",
    "SimpleITK": "SimpleITK>=2.3",
    "pydicom": "pydicom>=3.0",
    "highdicom": "highdicom>=0.23",
    "matplotlib": "matplotlib>=3.8",
}
MARGIN_COLOR_NODE_ID = "vtkMRMLColorTableNodeRainbow"
MARGIN_RANGE_MM = (-5.0, 10.0)
# The expected-registration-error overlay: Slicer's Viridis table (a file colour table; its node ID is
# "vtkMRMLColorTableNodeFile" + file name, as Slicer's own code uses it), window 0-5 mm, blended over the CT.
EXPECTED_ERROR_NAME = "IKR expected error (mm)"
EXPECTED_ERROR_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileViridis.txt"
EXPECTED_ERROR_RANGE_MM = (0.0, 5.0)
EXPECTED_ERROR_OPACITY = 0.4
SUGGESTIONS_NAME = "IKR suggested clicks"
SUGGESTIONS_COLOR = (1.0, 0.75, 0.0)  # amber: apart from the default colour of the fixed/moving point lists


class RegistrationCancelled(Exception):
    """Raised from the progress callback when the user presses Cancel."""


class ImplicitKernelRegistration(ScriptedLoadableModule):
    """Module description shown in Slicer's module list."""

    def __init__(self, parent) -> None:
        """Set the module's title, category, contributors and help."""
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Implicit Kernel Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["ImplicitKernelRegistration contributors"]
        self.parent.helpText = (
            "Deformable CT-to-CT registration (sparse keypoint matching and a learned kernel), "
            "refined by clicking point pairs, with ablation-margin review and export. "
            "See docs/user_guide.md in the extension's repository."
        )
        self.parent.acknowledgementText = "Built on 3D Slicer, SimpleITK, VTK and PyTorch."


@parameterNodeWrapper
class ImplicitKernelRegistrationParameterNode:
    """The module's state, saved with the scene."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: vtkMRMLSegmentationNode
    movingMask: vtkMRMLSegmentationNode
    tumourSegmentation: vtkMRMLSegmentationNode
    ablationSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    spacingMm: Annotated[float, WithinRange(1.0, 4.0)] = 2.0
    resampleMoving: bool = False
    outputTransform: vtkMRMLGridTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    correspondences: vtkMRMLMarkupsFiducialNode
    fixedPoints: vtkMRMLMarkupsFiducialNode
    movingPoints: vtkMRMLMarkupsFiducialNode
    marginModel: vtkMRMLModelNode
    outputFolder: pathlib.Path
    marginSummary: str = ""
    expectedErrorVolume: vtkMRMLScalarVolumeNode
    showExpectedError: bool = False
    numberOfSuggestions: Annotated[int, WithinRange(1, 20)] = 5
    suggestedClicks: vtkMRMLMarkupsFiducialNode


class ImplicitKernelRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and forwards button presses to the logic."""

    def __init__(self, parent=None) -> None:
        """Start without a logic or parameter node (made in setup)."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelRequested = False

    def setup(self) -> None:
        """Load the UI, connect the buttons and the parameter node."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ImplicitKernelRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ImplicitKernelRegistrationLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.registerButton.connect("clicked(bool)", self.onRegister)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.addPairButton.connect("clicked(bool)", self.onAddPairs)
        self.ui.deletePairButton.connect("clicked(bool)", self.onDeletePair)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.showCorrespondencesCheckBox.connect("toggled(bool)", self.onShowCorrespondences)
        self.ui.showExpectedErrorCheckBox.connect("toggled(bool)", self.onShowExpectedError)
        self.ui.suggestClicksButton.connect("clicked(bool)", self.onSuggestClicks)
        self.ui.computeMarginsButton.connect("clicked(bool)", self.onComputeMargins)
        self.ui.jumpToMinimumButton.connect("clicked(bool)", self.onJumpToMinimum)
        self.ui.saveReportButton.connect("clicked(bool)", self.onSaveReport)
        self.ui.exportTransformButton.connect("clicked(bool)", self.onExportTransform)
        self.ui.exportSegmentationButton.connect("clicked(bool)", self.onExportSegmentation)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Remove observers when the application closes."""
        self.removeObservers()

    def enter(self) -> None:
        """Reconnect the parameter node when the module is shown."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Disconnect the GUI from the parameter node when another module is shown."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        """Forget the parameter node (and the in-memory session) before the scene closes."""
        self.setParameterNode(None)
        self.logic.reset()

    def onSceneEndClose(self, caller, event) -> None:
        """Make a fresh parameter node after the scene closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Use the scene's parameter node (made on first use)."""
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode) -> None:
        """Connect the GUI to `parameterNode` (None disconnects)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # ------------------------------------------------------------------------------ registration

    def _ensureRequirements(self) -> bool:
        """Ask before installing missing Python packages (PyTorch first); False when the user declines."""
        missing = self.logic.missingRequirements()
        if not missing:
            return True
        text = (
            "The registration needs Python packages that are not installed: "
            + ", ".join(missing)
            + ".\nInstall them now? This downloads them and may take several minutes."
        )
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle="Install required packages"):
            return False
        with slicer.util.tryWithErrorDisplay("Installing the packages failed.", waitCursor=True):
            self.logic.installRequirements(missing)
            return not self.logic.missingRequirements()
        return False

    def _progress(self, fraction: float, message: str) -> None:
        """Show progress, let Slicer's event loop turn, and stop when Cancel was pressed."""
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()
        if self._cancelRequested:
            raise RegistrationCancelled()

    def onRegister(self) -> None:
        """Register the moving volume to the fixed one and show the result."""
        if not self._ensureRequirements():
            return
        self._cancelRequested = False
        self.ui.cancelButton.enabled = True
        self.ui.registerButton.enabled = False
        try:
            with slicer.util.tryWithErrorDisplay("Registration failed.", waitCursor=True):
                self.logic.register(self._parameterNode, self._progress)
                self._refreshPairTable()
        except RegistrationCancelled:
            self.ui.statusLabel.text = "cancelled"
        finally:
            self.ui.cancelButton.enabled = False
            self.ui.registerButton.enabled = True

    def onCancel(self) -> None:
        """Ask the running registration to stop at its next step."""
        self._cancelRequested = True

    def onShowCorrespondences(self, show: bool) -> None:
        """Show or hide the automatic correspondences."""
        self.logic.setCorrespondencesVisible(self._parameterNode, show)

    # ------------------------------------------------------------------------------ refinement

    def _refreshPairTable(self) -> None:
        """Fill the pair table from the session's feedback."""
        rows = slicer_bridge.feedback_rows(self.logic.pairFeedback())
        table = self.ui.pairTable
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                table.setItem(r, c, qt.QTableWidgetItem(text))

    def onAddPairs(self) -> None:
        """Add the newly placed fixed/moving point pairs and rebuild the field."""
        with slicer.util.tryWithErrorDisplay("Adding the pair failed.", waitCursor=True):
            self.logic.syncPairs(self._parameterNode)
            self._refreshPairTable()

    def onDeletePair(self) -> None:
        """Delete the pair selected in the table."""
        row = self.ui.pairTable.currentRow()
        if row < 0:
            return
        pairId = int(self.ui.pairTable.item(row, 0).text())
        with slicer.util.tryWithErrorDisplay("Deleting the pair failed.", waitCursor=True):
            self.logic.removePair(self._parameterNode, pairId)
            self._refreshPairTable()

    def onUndo(self) -> None:
        """Undo the last pair added or deleted."""
        with slicer.util.tryWithErrorDisplay("Undo failed.", waitCursor=True):
            self.logic.undo(self._parameterNode)
            self._refreshPairTable()

    # ------------------------------------------------------------------------------ expected error

    def onShowExpectedError(self, show: bool) -> None:
        """Show the expected-error map as the slice views' foreground (computed when stale), or hide it."""
        if self._parameterNode is None:
            return
        try:
            with slicer.util.tryWithErrorDisplay("Showing the expected error failed.", waitCursor=True):
                self.logic.setExpectedErrorVisible(self._parameterNode, show)
        except Exception:
            if show:  # e.g. nothing registered yet: untick (the parameter node follows the check box)
                self.ui.showExpectedErrorCheckBox.checked = False
            raise

    def onSuggestClicks(self) -> None:
        """Suggest where a clicked pair would help most; the points go into the suggested-clicks list."""
        if not self._ensureRequirements():
            return
        with slicer.util.tryWithErrorDisplay("Suggesting clicks failed.", waitCursor=True):
            points = self.logic.suggestClicks(self._parameterNode)
            self.ui.statusLabel.text = f"{len(points)} suggested clicks in {SUGGESTIONS_NAME!r} (the first is centred)"

    # ------------------------------------------------------------------------------ margins, export

    def onComputeMargins(self) -> None:
        """Compute the ablation margins and show the margin-coloured tumour surface."""
        if not self._ensureRequirements():
            return
        with slicer.util.tryWithErrorDisplay("Margin computation failed.", waitCursor=True):
            self.logic.computeMargins(self._parameterNode)

    def onJumpToMinimum(self) -> None:
        """Centre the slice views on the point of minimal margin."""
        with slicer.util.tryWithErrorDisplay("No margin computed yet."):
            self.logic.jumpToMinimalMargin()

    def _chosenFolder(self, title: str) -> str:
        """A folder chosen by the user ('' when cancelled)."""
        return qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), title)

    def onSaveReport(self) -> None:
        """Save the margin report (HTML, JSON, surface) into a new folder."""
        folder = self._chosenFolder("Folder for the margin report (a new folder is created inside)")
        if folder:
            with slicer.util.tryWithErrorDisplay("Saving the report failed.", waitCursor=True):
                self.logic.saveMarginReport(self._parameterNode, pathlib.Path(folder) / "margin_report")

    def onExportTransform(self) -> None:
        """Save the transform as .h5 (ITK) or the displacement field as .nii.gz."""
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), "Export transform", "transform.h5", "Transforms (*.h5 *.tfm *.nii.gz *.nrrd)"
        )
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.logic.exportTransform(path)

    def onExportSegmentation(self) -> None:
        """Save the tumour segmentation warped onto the fixed grid."""
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(),
            "Export warped segmentation",
            "tumour_warped.seg.nrrd",
            "Labels (*.seg.nrrd *.nii.gz)",
        )
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.logic.exportWarpedSegmentation(self._parameterNode, self._parameterNode.tumourSegmentation, path)


class ImplicitKernelRegistrationLogic(ScriptedLoadableModuleLogic):
    """MRML nodes <-> library types, and the library calls; no Qt, usable from Slicer's Python console."""

    def __init__(self) -> None:
        """Start with no registration in memory."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.reset()

    def reset(self) -> None:
        """Forget the in-memory registration, refinement session, expected-error map and margins."""
        self.fixedImage = None
        self.movingImage = None
        self.result = None
        self.session = None
        self.expectedError = None  # the session's expected-error map (library Image); None: not computed or stale
        self.marginResult = None
        self.marginInterval = None  # the minimal margin's interval over the uncertainty (uncertainty.margin_interval)
        self.marginErrorMap = None  # the expected-error map the interval was computed from
        self._foregroundBefore = {}  # slice composite node ID -> (foreground volume ID, opacity) before the overlay

    def getParameterNode(self) -> ImplicitKernelRegistrationParameterNode:
        """The module's parameter node in the scene (typed)."""
        return ImplicitKernelRegistrationParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------------ requirements

    @staticmethod
    def missingRequirements() -> list[str]:
        """Python modules the library needs that are not importable here."""
        return [name for name in REQUIREMENTS if importlib.util.find_spec(name) is None]

    @staticmethod
    def installRequirements(missing: list[str]) -> None:
        """Install missing packages: torch through the PyTorch extension when it is there, else pip."""
        if "torch" in missing and hasattr(slicer.modules, "pytorchutils"):
            import PyTorchUtils

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(torchVersionRequirement=TORCH_REQUIREMENT) is None:
                raise IkrError("PyTorch was not installed")
            missing = [name for name in missing if name != "torch"]
        if missing:
            slicer.util.pip_install([REQUIREMENTS[name] for name in missing])

    # ------------------------------------------------------------------------------ MRML -> library

    @staticmethod
    def imageFromVolume(volumeNode) -> Image:
        """The volume's voxels and geometry as a library Image (LPS); refuses transformed volumes."""
        if volumeNode is None:
            raise IkrError("no volume selected")
        if volumeNode.GetParentTransformNode() is not None:
            raise IkrError(f"volume {volumeNode.GetName()!r} is under a transform: harden or remove it first")
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        array = slicer.util.arrayFromVolume(volumeNode)
        return slicer_bridge.image_from_volume_array(array, slicer.util.arrayFromVTKMatrix(matrix))

    @staticmethod
    def maskFromSegmentation(segmentationNode, referenceVolume) -> Image | None:
        """The union of every segment as a uint8 mask on the reference volume's grid (None without a node)."""
        if segmentationNode is None:
            return None
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            raise IkrError(f"segmentation {segmentationNode.GetName()!r} has no segments")
        matrix = vtk.vtkMatrix4x4()
        referenceVolume.GetIJKToRASMatrix(matrix)
        union = None
        for i in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(i)
            array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolume)
            union = array > 0 if union is None else union | (array > 0)
        return slicer_bridge.image_from_volume_array(union.astype(np.uint8), slicer.util.arrayFromVTKMatrix(matrix))

    # ------------------------------------------------------------------------------ registration

    def register(self, parameterNode, progress=None) -> None:
        """Register moving to fixed, then show the transform, the moved volume and the correspondences."""
        from ImplicitKernelRegistrationLib.pipeline import RegistrationConfig, register
        from ImplicitKernelRegistrationLib.refine import session_from_result

        p = parameterNode
        fixed = self.imageFromVolume(p.fixedVolume)
        moving = self.imageFromVolume(p.movingVolume)
        fixedMask = self.maskFromSegmentation(p.fixedMask, p.fixedVolume)
        movingMask = self.maskFromSegmentation(p.movingMask, p.movingVolume)
        config = RegistrationConfig(spacing_mm=float(p.spacingMm), device=p.device)  # shipped weights: resources
        self.result = register(fixed, moving, config, fixedMask, movingMask, progress)
        self.fixedImage, self.movingImage = fixed, moving
        self.session = session_from_result(self.result, fixed)
        self.showField(p)
        self.showCorrespondences(p)
        self.ensurePairNodes(p)
        self._afterFieldChange(p, compute=True)  # the expected-error map, written with the outputs below
        self.saveSession(p, full=True)
        logging.info("registration: %s", {k: self.result.report[k] for k in ("runtime_s", "device", "n_keypoints")})

    def showField(self, parameterNode) -> None:
        """Put the session's field into the output grid transform node and apply it to the moving volume."""
        p = parameterNode
        field = self.session.field
        if p.outputTransform is None:
            p.outputTransform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "IKR transform")
        node = p.outputTransform
        current = node.GetTransformFromParent()
        grid = current.GetDisplacementGrid() if isinstance(current, slicer.vtkOrientedGridTransform) else None
        if grid is not None and tuple(grid.GetDimensions()) == tuple(field.geometry.size):
            slicer.util.arrayFromGridTransform(node)[:] = slicer_bridge.grid_arrays(field).displacement_ras
            slicer.util.arrayFromGridTransformModified(node)
        else:
            transform = slicer.vtkOrientedGridTransform()
            transform.SetInterpolationModeToLinear()
            transform.SetGridDirectionMatrix(slicer_bridge.grid_direction_matrix(field))
            transform.SetDisplacementGridData(slicer_bridge.displacement_image_data(field))
            node.SetAndObserveTransformFromParent(transform)  # fixed -> moving is the resampling direction
        if p.resampleMoving:
            self._resampleMoving(p)
        else:
            p.movingVolume.SetAndObserveTransformNodeID(node.GetID())

    def _resampleMoving(self, parameterNode) -> None:
        """Write the moving volume resampled onto the fixed grid into the output volume node."""
        from ImplicitKernelRegistrationLib.fields import warp_image

        p = parameterNode
        warped = warp_image(self.movingImage, self.session.field)
        if p.outputVolume is None:
            p.outputVolume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "IKR moving resampled")
        slicer.util.updateVolumeFromArray(p.outputVolume, warped.array)
        ijkToRas = slicer_bridge.ijk_to_ras_matrix(warped.geometry)
        p.outputVolume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
        slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=p.outputVolume, foregroundOpacity=0.5)

    def showCorrespondences(self, parameterNode) -> None:
        """Show the automatic correspondences' fixed points as a locked (hideable) point list."""
        p = parameterNode
        corr = self.result.correspondences
        points = lps_ras(corr.fixed_lps[corr.confidence > 0])
        if p.correspondences is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "IKR correspondences")
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetPointLabelsVisibility(False)
            p.correspondences = node
        slicer.util.updateMarkupsControlPointsFromArray(p.correspondences, points)
        p.correspondences.SetLocked(True)

    @staticmethod
    def setCorrespondencesVisible(parameterNode, visible: bool) -> None:
        """Show or hide the automatic correspondences."""
        if parameterNode.correspondences is not None:
            parameterNode.correspondences.SetDisplayVisibility(bool(visible))

    # ------------------------------------------------------------------------------ refinement

    def ensurePairNodes(self, parameterNode) -> None:
        """Make the fixed and moving point lists of the pair workflow (the moving one follows the moving volume)."""
        p = parameterNode
        if p.fixedPoints is None:
            p.fixedPoints = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "IKR fixed points")
        if p.movingPoints is None:
            p.movingPoints = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "IKR moving points")
        # Under the moving volume's transform, local coordinates are moving-space positions.
        p.movingPoints.SetAndObserveTransformNodeID(p.movingVolume.GetTransformNodeID())

    @staticmethod
    def _definedPoints(markupsNode) -> np.ndarray:
        """RAS positions (node coordinates) of the placed control points, in list order."""
        positions = slicer.util.arrayFromMarkupsControlPoints(markupsNode)
        defined = [
            markupsNode.GetNthControlPointPositionStatus(i) == slicer.vtkMRMLMarkupsNode.PositionDefined
            for i in range(markupsNode.GetNumberOfControlPoints())
        ]
        return positions[np.asarray(defined, dtype=bool)] if len(positions) else positions.reshape(0, 3)

    def openSession(self, parameterNode) -> None:
        """Resume the refinement session from the output folder when none is in memory."""
        if self.session is not None:
            return
        from ImplicitKernelRegistrationLib.correspondences import AUTOMATIC
        from ImplicitKernelRegistrationLib.io.outputs import OUTPUT_FILES, read_correspondences_csv, read_session
        from ImplicitKernelRegistrationLib.refine import open_session

        p = parameterNode
        if not p.outputFolder or not (pathlib.Path(p.outputFolder) / OUTPUT_FILES["session"]).is_file():
            raise IkrError("register first (or choose the output folder of an earlier registration)")
        saved = read_session(p.outputFolder)
        everything = read_correspondences_csv(pathlib.Path(p.outputFolder) / OUTPUT_FILES["correspondences"])
        self.fixedImage = self.imageFromVolume(p.fixedVolume)
        self.session = open_session(self.fixedImage, saved, everything.subset(everything.source == AUTOMATIC))

    def pairFeedback(self) -> list[dict]:
        """The session's per-pair feedback (empty without a session)."""
        return self.session.feedback() if self.session is not None else []

    def syncPairs(self, parameterNode) -> list[int]:
        """Add every newly completed fixed/moving point pair to the session; update the transform."""
        p = parameterNode
        self.openSession(p)
        known = len(self.session.pairs)
        fixedLps, movingLps = slicer_bridge.complete_pairs(
            self._definedPoints(p.fixedPoints)[known:], self._definedPoints(p.movingPoints)[known:]
        )
        if len(fixedLps) == 0:
            return []
        ids = self.session.add_correspondences(fixedLps, movingLps)
        self._afterEdit(p)
        return ids

    def removePair(self, parameterNode, pairId: int) -> None:
        """Delete one pair by id and rebuild the field."""
        self.openSession(parameterNode)
        self.session.remove_correspondence(pairId)
        self._afterEdit(parameterNode)

    def undo(self, parameterNode) -> None:
        """Undo the last add or delete."""
        self.openSession(parameterNode)
        self.session.undo()
        self._afterEdit(parameterNode)

    def _afterEdit(self, parameterNode) -> None:
        """Mirror the session's pairs into the point lists, update the transform, save the session."""
        p = parameterNode
        fixedRas, movingRas, labels = slicer_bridge.pairs_ras(self.session.feedback())
        for node, points in ((p.fixedPoints, fixedRas), (p.movingPoints, movingRas)):
            slicer.util.updateMarkupsControlPointsFromArray(node, points)
            for i, label in enumerate(labels):
                node.SetNthControlPointLabel(i, label)
        self.showField(p)
        self.saveSession(p)
        self._afterFieldChange(p, compute=bool(p.showExpectedError))

    def saveSession(self, parameterNode, full: bool = False) -> None:
        """Write the session (and after a registration every output) into the output folder, if one is set."""
        from ImplicitKernelRegistrationLib.io.outputs import read_session, write_registration, write_session

        p = parameterNode
        if not p.outputFolder or str(p.outputFolder) in ("", "."):
            return
        outdir = pathlib.Path(p.outputFolder)
        if full:
            from ImplicitKernelRegistrationLib.fields import warp_image

            session = {
                "inputs": {"fixed": p.fixedVolume.GetName(), "moving": p.movingVolume.GetName()},
                "config": self.result.report["config"],
                "working_geometry": self.result.working_geometry.to_dict(),
                "user": self.session.to_dict(),
            }
            warped = warp_image(self.movingImage, self.session.field)
            write_registration(
                outdir,
                self.session.field,
                warped,
                self.result.correspondences,
                self.result.report,
                session,
                self.expectedError,  # uncertainty.nii.gz, read by `ikr suggest` and `ikr margin --uncertainty`
            )
            return
        saved = read_session(outdir)
        saved["user"] = self.session.to_dict()
        write_session(outdir, saved, self.session.automatic.concat(self.session.user_correspondences()))

    # ------------------------------------------------------------------------------ expected error, suggestions

    def _afterFieldChange(self, parameterNode, compute: bool) -> None:
        """The field changed: the expected-error map is stale; recompute it when `compute` (see updateExpectedError).

        A failure here (e.g. a session of an older version without the kernel's key set) only logs a warning:
        the registration or the edit itself has succeeded.
        """
        p = parameterNode
        self.expectedError = None
        if compute:
            try:
                self.updateExpectedError(p)
            except IkrError as err:
                logging.warning("the expected-error map was not updated: %s", err)
        if p.showExpectedError and p.expectedErrorVolume is not None:
            self.setExpectedErrorVisible(p, True)  # the resampled moving volume may have taken the foreground

    def updateExpectedError(self, parameterNode) -> Image:
        """The expected registration error (mm, fixed grid) of the current session, also in its volume node.

        The map is uncertainty.expected_error_map(session): one kernel pass over the keys plus a
        resampling onto the fixed grid (about a tenth of a registration's time; each clicked pair adds a
        blend over the whole fixed grid). So that clicking pairs stays fast it is computed:
        - after every registration (it is also written to the output folder as uncertainty.nii.gz);
        - after a refinement edit (add, delete, undo) only while *Show expected error* is on;
        - otherwise here, on demand, when something needs it and the map is stale: turning the overlay
          on, *Suggest where to click*, *Compute margins* (the margin's interval).
        The node "IKR expected error (mm)" (parameter `expectedErrorVolume`) is made once and reused; it is
        not put into the slice views here (see setExpectedErrorVisible).
        """
        from ImplicitKernelRegistrationLib.uncertainty import expected_error_map

        p = parameterNode
        if self.expectedError is None:
            self.openSession(p)
            self.expectedError = expected_error_map(self.session)
            self._writeExpectedErrorNode(p, self.expectedError)
        elif p.expectedErrorVolume is None:
            self._writeExpectedErrorNode(p, self.expectedError)
        return self.expectedError

    @staticmethod
    def _writeExpectedErrorNode(parameterNode, image: Image) -> None:
        """Put the map into the expected-error volume node (made on first use) with its colour table and window."""
        p = parameterNode
        ijkToRas = slicer_bridge.ijk_to_ras_matrix(image.geometry)
        if p.expectedErrorVolume is None:
            p.expectedErrorVolume = slicer.util.addVolumeFromArray(
                image.array, ijkToRAS=ijkToRas, name=EXPECTED_ERROR_NAME
            )
        else:
            slicer.util.updateVolumeFromArray(p.expectedErrorVolume, image.array)
            p.expectedErrorVolume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
        if p.expectedErrorVolume.GetDisplayNode() is None:
            p.expectedErrorVolume.CreateDefaultDisplayNodes()
        display = p.expectedErrorVolume.GetDisplayNode()
        display.SetAndObserveColorNodeID(EXPECTED_ERROR_COLOR_NODE_ID)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(*EXPECTED_ERROR_RANGE_MM)

    def setExpectedErrorVisible(self, parameterNode, visible: bool) -> None:
        """Blend the expected-error map over every slice view (foreground layer), or put back what was there."""
        p = parameterNode
        composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
        if not visible:
            node = p.expectedErrorVolume
            for composite in composites:
                if node is not None and composite.GetForegroundVolumeID() == node.GetID():
                    previousId, opacity = self._foregroundBefore.get(composite.GetID(), (None, None))
                    if previousId is not None and slicer.mrmlScene.GetNodeByID(previousId) is None:
                        previousId = None
                    composite.SetForegroundVolumeID(previousId)
                    if opacity is not None:
                        composite.SetForegroundOpacity(opacity)
            self._foregroundBefore = {}
            return
        if self.session is not None or p.expectedErrorVolume is None:
            self.updateExpectedError(p)  # a node saved with the scene is shown as it is until a session is open
        node = p.expectedErrorVolume
        for composite in composites:
            if composite.GetForegroundVolumeID() != node.GetID():
                self._foregroundBefore[composite.GetID()] = (
                    composite.GetForegroundVolumeID(),
                    composite.GetForegroundOpacity(),
                )
        slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=EXPECTED_ERROR_OPACITY)

    def suggestionMask(self, parameterNode) -> Image | None:
        """Where suggestions should lie near (fixed space): the tumour warped through the current field when
        one is chosen, else the ablation zone, else None (anywhere in the body)."""
        from ImplicitKernelRegistrationLib.fields import warp_labels

        p = parameterNode
        if p.tumourSegmentation is not None:
            tumour = self.maskFromSegmentation(p.tumourSegmentation, p.movingVolume)  # drawn on the moving CT
            return warp_labels(tumour, self.session.field)
        if p.ablationSegmentation is not None:
            return self.maskFromSegmentation(p.ablationSegmentation, p.fixedVolume)
        return None

    def suggestClicks(self, parameterNode, n: int | None = None) -> np.ndarray:
        """Fixed-space points (LPS, (k, 3), k <= n) where one clicked pair would remove the most expected error.

        uncertainty.suggest_clicks on the current map, inside the body of the fixed CT (as `ikr suggest`)
        and near suggestionMask(). The points replace those of the "IKR suggested clicks" list (parameter
        `suggestedClicks`), labelled with the expected error there; the slice views jump to the first.
        """
        from ImplicitKernelRegistrationLib.preprocess import body_mask
        from ImplicitKernelRegistrationLib.uncertainty import suggest_clicks

        p = parameterNode
        error = self.updateExpectedError(p)  # opens the session (and reads the fixed CT) when needed
        fixed = self.fixedImage
        body = Image(body_mask(fixed).astype(np.uint8), fixed.geometry)
        n = int(p.numberOfSuggestions if n is None else n)
        points = suggest_clicks(error, n, near_mask=self.suggestionMask(p), region=body)
        if len(points) == 0:
            raise IkrError("no place was found where a clicked pair would reduce the expected error")
        index = np.rint(error.geometry.lps_to_index(points)).astype(int)
        index = np.clip(index, 0, np.asarray(error.geometry.size) - 1)
        values = error.array[index[:, 2], index[:, 1], index[:, 0]]  # the map at each point (nearest voxel)
        if p.suggestedClicks is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", SUGGESTIONS_NAME)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor(*SUGGESTIONS_COLOR)
            p.suggestedClicks = node
        slicer.util.updateMarkupsControlPointsFromArray(p.suggestedClicks, lps_ras(points))
        for i, value in enumerate(values):
            p.suggestedClicks.SetNthControlPointLabel(i, f"click {i + 1}: {value:.1f} mm")
        p.suggestedClicks.SetLocked(True)
        self.jumpToPoint(points[0])
        return points

    @staticmethod
    def jumpToPoint(pointLps) -> None:
        """Centre every slice view on a fixed-space (LPS) point."""
        r, a, s = lps_ras(np.asarray(pointLps, dtype=np.float64))
        slicer.modules.markups.logic().JumpSlicesToLocation(float(r), float(a), float(s), True)

    # ------------------------------------------------------------------------------ margins

    def computeMargins(self, parameterNode) -> dict:
        """Margins of the tumour (moving) warped to the ablation zone (fixed); show the coloured surface.

        With a registration, also the minimal margin's 5-95 % interval over the expected error (its figures are
        returned with the margin's, as in margin.json of `ikr margin --uncertainty`, and shown in the summary).
        """
        from ImplicitKernelRegistrationLib.margin import compute_margin

        p = parameterNode
        if p.tumourSegmentation is None or p.ablationSegmentation is None:
            raise IkrError("choose the tumour and the ablation-zone segmentations")
        tumour = self.maskFromSegmentation(p.tumourSegmentation, p.movingVolume)
        ablation = self.maskFromSegmentation(p.ablationSegmentation, p.fixedVolume)
        field = self.session.field if self.session is not None else None
        self.marginResult = compute_margin(tumour, ablation, field)
        self.marginInterval = self.marginErrorMap = None
        r = self.marginResult
        poly = slicer_bridge.margin_polydata_ras(r.surface.points_lps, r.surface.triangles, r.margins_mm)
        if p.marginModel is None:
            p.marginModel = slicer.modules.models.logic().AddModel(poly)
            p.marginModel.SetName("IKR tumour margin")
        else:
            p.marginModel.SetAndObservePolyData(poly)
        display = p.marginModel.GetDisplayNode()
        display.SetActiveScalar("margin_mm", vtk.vtkAssignAttribute.POINT_DATA)
        display.SetAndObserveColorNodeID(MARGIN_COLOR_NODE_ID)
        display.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseManualScalarRange)
        display.SetScalarRange(*MARGIN_RANGE_MM)
        display.SetScalarVisibility(True)
        display.SetVisibility2D(True)
        figures = r.figures()
        summary = (
            f"minimal margin {figures['min_margin_mm']:.1f} mm, coverage {figures['coverage_percent']:.1f} %, "
            f"tumour outside the zone {figures['outside_volume_ml']:.2f} ml"
        )
        if field is not None:
            summary += "\n" + self._computeMarginInterval(p, tumour, ablation)
        p.marginSummary = summary
        return {**figures, **(self.marginInterval or {})}

    def _computeMarginInterval(self, parameterNode, tumour: Image, ablation: Image) -> str:
        """The minimal margin's 5-95 % interval over the expected error (uncertainty.margin_interval); its line."""
        from ImplicitKernelRegistrationLib.uncertainty import margin_interval

        try:
            error = self.updateExpectedError(parameterNode)
            interval = margin_interval(tumour, ablation, self.session.field, error, point=self.marginResult)
        except IkrError as err:
            logging.warning("no margin interval: %s", err)
            return f"minimal margin 5-95 %: not available ({err.problem})"
        interval.pop("sampled_min_margins_mm", None)
        self.marginInterval, self.marginErrorMap = interval, error
        return (
            f"minimal margin 5-95 %: {interval['min_margin_p5_mm']:.1f} .. {interval['min_margin_p95_mm']:.1f} mm; "
            f"P(<0 mm) {interval['p_min_margin_below_0mm']:.2f}, P(<5 mm) {interval['p_min_margin_below_5mm']:.2f}"
        )

    def jumpToMinimalMargin(self) -> None:
        """Centre every slice view on the point of minimal margin."""
        if self.marginResult is None:
            raise IkrError("compute the margins first")
        self.jumpToPoint(self.marginResult.min_margin_point_lps)

    def saveMarginReport(self, parameterNode, outdir) -> pathlib.Path:
        """Write report.html, margin.json, margin_points.csv, the surface and the warped tumour (all or nothing).

        With a margin interval (computed with the margins), margin.json carries its figures and the report
        its row and the expected error's isolines, as `ikr margin --uncertainty` writes them.
        """
        import json

        from ImplicitKernelRegistrationLib.io.atomic import atomic_directory, write_text_atomic
        from ImplicitKernelRegistrationLib.io.images import write_image
        from ImplicitKernelRegistrationLib.margin_report import (
            OUTPUT_FILES,
            points_csv,
            report_html,
            write_surface_vtp,
        )

        if self.marginResult is None:
            raise IkrError("compute the margins first")
        p = parameterNode
        info = {
            "inputs": {
                "tumour": p.tumourSegmentation.GetName(),
                "ablation": p.ablationSegmentation.GetName(),
                "transform": "refinement session" if self.session is not None else "identity (none)",
            }
        }
        if self.marginInterval is not None:
            info["inputs"]["uncertainty"] = "expected-error map of the refinement session"
        background = self.imageFromVolume(p.fixedVolume)
        page = report_html(self.marginResult, info, background, self.marginErrorMap, self.marginInterval)
        outdir = pathlib.Path(outdir)
        with atomic_directory(outdir) as tmp:
            summary = {**self.marginResult.figures(), **(self.marginInterval or {}), "coordinate_system": "LPS", **info}
            write_text_atomic(tmp / OUTPUT_FILES["json"], json.dumps(summary, indent=2))
            write_text_atomic(tmp / OUTPUT_FILES["html"], page)
            write_text_atomic(tmp / OUTPUT_FILES["points"], points_csv(self.marginResult))
            write_surface_vtp(self.marginResult, tmp / OUTPUT_FILES["surface"])
            write_image(self.marginResult.warped_tumour, tmp / OUTPUT_FILES["warped"])
        return outdir

    # ------------------------------------------------------------------------------ export

    def exportTransform(self, path) -> pathlib.Path:
        """Save the current field: .h5/.tfm as an ITK transform, .nii.gz/.nrrd as a displacement image."""
        from ImplicitKernelRegistrationLib.io.transforms import write_field, write_transform

        if self.session is None:
            raise IkrError("register first")
        name = str(path).lower()
        writer = write_transform if name.endswith((".h5", ".tfm")) else write_field
        return writer(self.session.field, path)

    def exportWarpedSegmentation(self, parameterNode, segmentationNode, path) -> pathlib.Path:
        """Save a segmentation drawn on the moving volume, warped onto the fixed grid (nearest neighbour)."""
        from ImplicitKernelRegistrationLib.fields import warp_image
        from ImplicitKernelRegistrationLib.io.segmentations import write_labels

        if self.session is None:
            raise IkrError("register first")
        if segmentationNode is None:
            raise IkrError("choose a segmentation to export")
        mask = self.maskFromSegmentation(segmentationNode, parameterNode.movingVolume)
        warped = warp_image(mask, self.session.field, interpolation="nearest", default_value=0)
        return write_labels(warped.with_array(warped.array.astype(np.uint8)), {1: segmentationNode.GetName()}, path)


class ImplicitKernelRegistrationTest(ScriptedLoadableModuleTest):
    """End-to-end self-test inside Slicer on the library's phantom: register, add a pair, expected error, margins."""

    def setUp(self) -> None:
        """Start from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """Run every test."""
        self.setUp()
        self.test_RegisterRefineMargins()

    def _addVolume(self, image: Image, name: str):
        """Add a library Image to the scene as a scalar volume."""
        ijkToRas = slicer_bridge.ijk_to_ras_matrix(image.geometry)
        return slicer.util.addVolumeFromArray(image.array, ijkToRAS=ijkToRas, name=name)

    def _addSegmentation(self, mask: Image, name: str):
        """Add a mask as a one-segment segmentation node (through a labelmap volume)."""
        labels = (mask.array >= 0.5).astype(np.uint8)
        ijkToRas = slicer_bridge.ijk_to_ras_matrix(mask.geometry)
        labelmap = slicer.util.addVolumeFromArray(
            labels, ijkToRAS=ijkToRas, name=name, nodeClassName="vtkMRMLLabelMapVolumeNode"
        )
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
        slicer.mrmlScene.RemoveNode(labelmap)
        return segmentation

    def test_RegisterRefineMargins(self) -> None:
        """Phantom pair: register, add a pair (honoured), expected error and suggestions, margins with interval."""
        logic = ImplicitKernelRegistrationLogic()
        missing = logic.missingRequirements()
        if missing:
            self.skipTest(f"needs {missing}: install them from the module first")
        from ImplicitKernelRegistrationLib.fields import sample_field, transform_points
        from ImplicitKernelRegistrationLib.margin import demo_tumour_and_zone
        from ImplicitKernelRegistrationLib.phantom import make_phantom
        from ImplicitKernelRegistrationLib.synth import make_case

        self.delayDisplay("Making a phantom pair")
        ct = make_phantom(seed=1, size=(96, 80, 64), spacing_mm=(3.0, 3.0, 3.0))[0]
        case = make_case(ct, "breathing", 1)
        p = logic.getParameterNode()
        p.fixedVolume = self._addVolume(case.fixed, "fixed")
        p.movingVolume = self._addVolume(case.moving, "moving")
        p.spacingMm = 3.0
        p.device = "cpu"

        self.delayDisplay("Registering")
        logic.register(p)
        self.assertIsNotNone(p.outputTransform)
        self.assertEqual(p.movingVolume.GetTransformNodeID(), p.outputTransform.GetID())
        fixedLps = case.landmarks_fixed_lps[:1]
        expected = lps_ras(transform_points(logic.session.field, fixedLps))[0]
        got = p.outputTransform.GetTransformFromParent().TransformPoint(*lps_ras(fixedLps)[0])
        self.assertLess(np.linalg.norm(np.asarray(got) - expected), 0.1)

        self.delayDisplay("Adding a pair")
        target = case.landmarks_moving_lps[:1] + np.array([[2.0, 0.0, 0.0]])
        before = sample_field(logic.session.field, fixedLps)[0].copy()
        p.fixedPoints.AddControlPoint(*lps_ras(fixedLps)[0])
        p.movingPoints.AddControlPoint(*lps_ras(target)[0])
        self.assertEqual(len(logic.syncPairs(p)), 1)
        after = sample_field(logic.session.field, fixedLps)[0]
        self.assertGreater(np.linalg.norm(after - before), 0.5)
        self.assertLess(logic.pairFeedback()[0]["residual_mm"], 0.5)

        self.delayDisplay("Expected error and suggested clicks")
        error = logic.updateExpectedError(p)
        self.assertIsNotNone(p.expectedErrorVolume)
        self.assertEqual(p.expectedErrorVolume.GetName(), EXPECTED_ERROR_NAME)
        self.assertEqual(slicer.util.arrayFromVolume(p.expectedErrorVolume).shape, case.fixed.array.shape)
        self.assertTrue(np.all(np.isfinite(error.array)) and float(error.array.max()) > 0.0)
        logic.setExpectedErrorVisible(p, True)
        logic.setExpectedErrorVisible(p, False)
        p.numberOfSuggestions = 3
        points = logic.suggestClicks(p)
        self.assertGreaterEqual(len(points), 1)
        self.assertLessEqual(len(points), 3)
        self.assertTrue(np.all(case.fixed.geometry.contains_lps(points)), points)
        self.assertEqual(p.suggestedClicks.GetNumberOfControlPoints(), len(points))
        logic.undo(p)
        np.testing.assert_allclose(sample_field(logic.session.field, fixedLps)[0], before, atol=1e-5)

        self.delayDisplay("Margins")
        tumour, zone, trueMargin = demo_tumour_and_zone(case.fixed, logic.session.field, None, 1)
        p.tumourSegmentation = self._addSegmentation(tumour, "tumour")
        p.ablationSegmentation = self._addSegmentation(zone, "ablation zone")
        figures = logic.computeMargins(p)
        self.assertLess(abs(figures["min_margin_mm"] - trueMargin), 3.0)
        self.assertIsNotNone(p.marginModel)
        self.assertIsNotNone(logic.marginInterval, p.marginSummary)
        self.assertLessEqual(figures["min_margin_p5_mm"], figures["min_margin_mm"])
        self.assertLessEqual(figures["min_margin_mm"], figures["min_margin_p95_mm"])
        self.assertIn("minimal margin 5-95 %", p.marginSummary)
        logic.jumpToMinimalMargin()
        self.assertGreaterEqual(len(logic.suggestClicks(p)), 1)  # now near the warped tumour

        self.delayDisplay("Margin report")
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            report = logic.saveMarginReport(p, pathlib.Path(folder) / "margin_report")
            self.assertIn("5th-95th percentile", (report / "report.html").read_text(encoding="utf-8"))
        self.delayDisplay("Test passed")
