"""ImplicitKernelRegistration: the 3D Slicer module (Slicer 5.10+, Python 3.12).

The widget only binds the UI to a parameter node; the logic converts MRML nodes to library types
(through ImplicitKernelRegistrationLib.slicer_bridge) and calls the library. No algorithm lives here.
Torch is imported only inside the logic, after the requirement check, never at module import.

Frames: the module's grid transform ("IKR transform") maps fixed (world) points to moving points (a transform
*from parent*). The moving volume, the moving point list and every segmentation drawn on the moving CT
before registration sit under it, so their own coordinates stay moving-CT coordinates; a segmentation drawn
after registration in the registered views lies in the fixed frame and Slicer's export brings it back.
"""

import contextlib
import logging
import pathlib
import time
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import (
    vtkMRMLColorTableNode,
    vtkMRMLGridTransformNode,
    vtkMRMLLinearTransformNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLModelNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTextNode,
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
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.geometry import Image, lps_ras
from ImplicitKernelRegistrationLib.requirements import (
    BUNDLED_WITH_SLICER,
    SLICER_REQUIREMENTS,
    TORCH_VERSION_RANGE,
    unmet_requirements,
)

TRANSFORM_NAME = "IKR transform"
MARGIN_COLOR_NAME = "IKR margin colours"  # red < 0 mm, yellow 0-5 mm, green >= 5 mm (slicer_bridge.MARGIN_CLASSES)
# The expected-registration-error overlay: Slicer's Viridis table (a file colour table; its node ID is
# "vtkMRMLColorTableNodeFile" + file name, as Slicer's own code uses it), window 0-5 mm, blended over the CT;
# voxels below 1 mm are not drawn, so the CT shows through where the registration is as good as a click.
EXPECTED_ERROR_NAME = "IKR expected error (mm)"
EXPECTED_ERROR_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileViridis.txt"
EXPECTED_ERROR_RANGE_MM = (0.0, 5.0)
EXPECTED_ERROR_THRESHOLD_MM = 1.0
EXPECTED_ERROR_OPACITY = 0.4
SUGGESTIONS_NAME = "IKR suggested clicks"
SUGGESTIONS_COLOR = (1.0, 0.75, 0.0)  # amber: apart from the default colour of the fixed/moving point lists
REGISTER_BLOCKED_PREFIX = "To register: "  # the status line's text while Register is disabled (then it says why)
# Widgets disabled while a registration runs (everything but Cancel, the progress bar and the status line).
BUSY_DISABLED = (
    "inputsCollapsible",
    "refinementCollapsible",
    "uncertaintyCollapsible",
    "marginsCollapsible",
    "exportCollapsible",
    "registerButton",
    "deviceComboBox",
    "spacingSpinBox",
    "resampleCheckBox",
    "outputTransformSelector",
    "outputVolumeSelector",
    "outputFolderEdit",
    "correspondencesSelector",
    "showCorrespondencesCheckBox",
)


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
    """The module's state, saved with the scene (the session too: sessionState, pairLinks)."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: vtkMRMLSegmentationNode
    movingMask: vtkMRMLSegmentationNode
    initialTransform: vtkMRMLLinearTransformNode  # the user's rigid/affine start (puts moving onto fixed)
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
    marginColors: vtkMRMLColorTableNode
    outputFolder: pathlib.Path
    marginSummary: str = ""
    qualitySummary: str = ""  # the last registration's quality verdict and reasons (slicer_bridge.quality_summary)
    expectedErrorVolume: vtkMRMLScalarVolumeNode
    showExpectedError: bool = False
    numberOfSuggestions: Annotated[int, WithinRange(1, 20)] = 5
    suggestedClicks: vtkMRMLMarkupsFiducialNode
    # What reopening the refinement session needs (slicer_bridge.session_state_json), kept with the scene.
    sessionState: vtkMRMLTextNode
    # Session pair ID -> IDs of its fixed and moving control points (slicer_bridge.links_to_json).
    pairLinks: str = ""


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
        self._running = False
        self._observedPointLists = []

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
        self.ui.pairTable.connect("cellClicked(int,int)", self.onPairClicked)
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
        # The display selectors show only the module's own list of their role (see slicer_bridge.ROLE_ATTRIBUTE).
        for selector, role in ((self.ui.correspondencesSelector, "correspondences"),
                               (self.ui.suggestedClicksSelector, "suggestions")):  # fmt: skip
            selector.addAttribute("vtkMRMLMarkupsFiducialNode", slicer_bridge.ROLE_ATTRIBUTE, role)
        self.ui.runLogTextEdit.setPlainText(self.logic.runLog.text())
        self.logic.runLog.listeners.append(self._appendLogLine)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Remove observers (and the run log's listener) when the application closes."""
        self.removeObservers()
        if self.logic is not None and self._appendLogLine in self.logic.runLog.listeners:
            self.logic.runLog.listeners.remove(self._appendLogLine)

    def _appendLogLine(self, line: str) -> None:
        """Show one new line of the run log."""
        self.ui.runLogTextEdit.appendPlainText(line)

    def enter(self) -> None:
        """Reconnect the parameter node when the module is shown."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Disconnect the GUI from the parameter node when another module is shown."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        """Stop a running registration, forget the parameter node and the in-memory session before the scene closes."""
        self._cancelRequested = True
        self._observePointLists(None)
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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self.logic.markOwnLists(self._parameterNode)  # lists of a scene saved before they were marked
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._observePointLists(self._parameterNode)
            self._refreshPairTable()
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """A parameter changed (a node chosen or made): update Register and the point-list selectors."""
        self._checkCanRegister()
        self._updatePointSelectors()

    def _checkCanRegister(self, caller=None, event=None) -> None:
        """Enable Register when it can run; otherwise its tooltip, and the status line when it is free, say why."""
        p = self._parameterNode
        blocker = slicer_bridge.register_blocker(
            p.fixedVolume.GetID() if p and p.fixedVolume else None,
            p.movingVolume.GetID() if p and p.movingVolume else None,
            self._running,
        )
        self.ui.registerButton.enabled = not blocker
        self.ui.registerButton.toolTip = blocker or "Register the moving volume to the fixed volume"
        shown = self.ui.statusLabel.text
        if not self._running and (not shown or shown.startswith(REGISTER_BLOCKED_PREFIX)):
            self.ui.statusLabel.text = f"{REGISTER_BLOCKED_PREFIX}{blocker}" if blocker else ""

    def _updatePointSelectors(self) -> None:
        """Keep the module's own point lists (correspondences, suggested clicks) and the other pair list out of the
        fixed and moving point selectors (slicer_bridge.point_selector_hidden_ids)."""
        p = self._parameterNode
        if p is None:
            return
        lists = [
            (node.GetID(), node.GetAttribute(slicer_bridge.ROLE_ATTRIBUTE))
            for node in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode")
        ]
        for selector, other in ((self.ui.fixedPointsSelector, p.movingPoints),
                                (self.ui.movingPointsSelector, p.fixedPoints)):  # fmt: skip
            hidden = slicer_bridge.point_selector_hidden_ids(lists, other.GetID() if other is not None else None)
            selector.sortFilterProxyModel().hiddenNodeIDs = hidden

    # ------------------------------------------------------------------------------ registration

    def _ensureRequirements(self) -> bool:
        """Ask before installing missing Python packages (PyTorch first); False when the user declines."""
        missing = self.logic.missingRequirements()
        if not missing:
            return True
        text = (
            "The registration needs Python packages that are not installed or too old: "
            + ", ".join(f"{name} ({why})" for name, why in missing.items())
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

    def _setBusy(self, busy: bool) -> None:
        """While a registration runs, only Cancel (and the progress display) stays enabled."""
        self._running = busy
        for name in BUSY_DISABLED:
            getattr(self.ui, name).enabled = not busy
        self.ui.cancelButton.enabled = busy
        self._checkCanRegister()

    def onRegister(self) -> None:
        """Register the moving volume to the fixed one and show the result."""
        if not self._ensureRequirements():
            return
        self._cancelRequested = False
        self._setBusy(True)
        try:
            with slicer.util.tryWithErrorDisplay("Registration failed.", waitCursor=True):
                try:
                    self.logic.register(self._parameterNode, self._progress)
                    self.ui.statusLabel.text = self.logic.lastMessage
                except RegistrationCancelled:  # inside the `with`: a cancellation is not an error to display
                    self.ui.statusLabel.text = f"cancelled ({self.logic.lastMessage})"
        finally:
            self._setBusy(False)
            self._observePointLists(self._parameterNode)
            self._refreshPairTable()
            self._updatePointSelectors()

    def onCancel(self) -> None:
        """Ask the running registration to stop at its next step."""
        self._cancelRequested = True

    def onShowCorrespondences(self, show: bool) -> None:
        """Show or hide the automatic correspondences."""
        self.logic.setCorrespondencesVisible(self._parameterNode, show)

    # ------------------------------------------------------------------------------ refinement

    def _observePointLists(self, parameterNode) -> None:
        """Update the pairs whenever a point is placed, let go after a drag, or deleted (one click per point)."""
        for node in self._observedPointLists:
            for event in ImplicitKernelRegistrationLogic.POINT_EVENTS:
                self.removeObserver(node, event, self.onPointsChanged)
        self._observedPointLists = []
        if parameterNode is None:
            return
        for node in (parameterNode.fixedPoints, parameterNode.movingPoints):
            if node is not None:
                for event in ImplicitKernelRegistrationLogic.POINT_EVENTS:
                    self.addObserver(node, event, self.onPointsChanged)
                self._observedPointLists.append(node)

    def onPointsChanged(self, caller, event) -> None:
        """A point list changed: add, move or remove pairs (nothing while the module itself edits the lists)."""
        if self._running or self.logic.editingLists or self._parameterNode is None:
            return
        if not self.logic.hasSession(self._parameterNode):
            return
        with slicer.util.tryWithErrorDisplay("Updating the pairs failed.", waitCursor=True):
            self.logic.syncPairs(self._parameterNode)
            self._refreshPairTable()

    def _refreshPairTable(self) -> None:
        """Fill the pair table from the session's feedback; the RMS residual goes to the status line."""
        feedback = self.logic.pairFeedback()
        rows = slicer_bridge.feedback_rows(feedback)
        table = self.ui.pairTable
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                table.setItem(r, c, qt.QTableWidgetItem(text))
        if feedback and not self._running:
            rms = slicer_bridge.residual_rms_mm(feedback)
            self.ui.statusLabel.text = f"{len(feedback)} pairs, residual RMS {rms:.2f} mm"

    def onPairClicked(self, row: int, column: int) -> None:
        """Centre the views on the clicked pair's fixed point."""
        item = self.ui.pairTable.item(row, 0)
        if item is not None:
            self.logic.jumpToPair(int(item.text()))

    def onAddPairs(self) -> None:
        """Add, move or remove pairs from the two point lists (the lists also update the pairs on every click)."""
        with slicer.util.tryWithErrorDisplay("Updating the pairs failed.", waitCursor=True):
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
        """Undo the last change of the pairs (one placed, dragged or deleted point, or one table delete)."""
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
        """Save the transform as .h5 (ITK; read by Slicer, SimpleITK, ANTs) or the displacement field as .nrrd."""
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), "Export transform", "transform.h5", "Transforms (*.h5 *.tfm *.nrrd *.mha)"
        )
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.logic.exportTransform(self._parameterNode, path)

    def onExportSegmentation(self) -> None:
        """Save the tumour segmentation warped onto the fixed grid."""
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(),
            "Export warped segmentation",
            "tumour_warped.seg.nrrd",
            "Labels (*.seg.nrrd *.nii.gz *.nrrd)",
        )
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.logic.exportWarpedSegmentation(self._parameterNode, self._parameterNode.tumourSegmentation, path)


class ImplicitKernelRegistrationLogic(ScriptedLoadableModuleLogic):
    """MRML nodes <-> library types, and the library calls; no Qt, usable from Slicer's Python console."""

    # Point-list events that change the pairs: a point placed, a drag let go, a point deleted.
    POINT_EVENTS = (
        slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
        slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent,
        slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
    )

    def __init__(self) -> None:
        """Start with no registration in memory."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.editingLists = False  # True while the logic itself edits the point lists (observers ignore it)
        self.runLog = slicer_bridge.RunLog()  # the panel's run log (kept across registrations; reset keeps it)
        self.runLog.listeners.append(logging.info)
        self.reset()

    def reset(self) -> None:
        """Forget the registration in memory (its workspace), the expected-error node's map and the margins."""
        self.workspace = None  # the registration under review (ImplicitKernelRegistrationLib.workspace.Workspace)
        self.shownErrorMap = None  # the expected-error map last put into its volume node
        self.marginReview = None  # workspace.MarginReview: margins and the minimal margin's interval
        self.lastMessage = ""
        self._foregroundBefore = {}  # slice composite node ID -> (foreground volume ID, opacity) before the overlay

    def getParameterNode(self) -> ImplicitKernelRegistrationParameterNode:
        """The module's parameter node in the scene (typed)."""
        return ImplicitKernelRegistrationParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------------ requirements

    @staticmethod
    def missingRequirements() -> dict[str, str]:
        """Packages the library needs that are missing or too old here (name -> why)."""
        return unmet_requirements(SLICER_REQUIREMENTS)

    @staticmethod
    def installRequirements(missing: dict[str, str]) -> None:
        """Install: torch through the PyTorch extension when it is there, else pip; never over Slicer's own packages."""
        bundled = [name for name in missing if name in BUNDLED_WITH_SLICER]
        if bundled:
            raise IkrError(
                f"{', '.join(bundled)} come with Slicer and are {', '.join(missing[n] for n in bundled)}: "
                "use Slicer 5.10 or later"
            )
        names = list(missing)
        if "torch" in names and hasattr(slicer.modules, "pytorchutils"):
            import PyTorchUtils

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(torchVersionRequirement=TORCH_VERSION_RANGE) is None:
                raise IkrError("PyTorch was not installed")
            names.remove("torch")
        if names:
            slicer.util.pip_install([SLICER_REQUIREMENTS[name] for name in names])

    # ------------------------------------------------------------------------------ MRML -> library

    def initialAlignment(self, parameterNode):
        """The chosen initial transform as the library's start alignment; None when there is none, or when the
        moving volume already sits under it (its voxels are then read through it)."""
        node = parameterNode.initialTransform
        if node is None:
            return None
        if node.GetID() in [t.GetID() for t in self._transformChain(parameterNode.movingVolume)]:
            return None
        if not node.IsLinear():
            raise ValueError(f"The initial transform {node.GetName()} is not linear: choose a rigid or affine one.")
        matrix = vtk.vtkMatrix4x4()
        node.GetMatrixTransformToWorld(matrix)
        return slicer_bridge.alignment_from_ras_to_parent(slicer.util.arrayFromVTKMatrix(matrix))

    @staticmethod
    def _transformChain(node) -> list:
        """The node's parent transform nodes, nearest first."""
        chain = []
        parent = node.GetParentTransformNode()
        while parent is not None and parent not in chain:
            chain.append(parent)
            parent = parent.GetParentTransformNode()
        return chain

    @staticmethod
    def _volumeImage(volumeNode) -> Image:
        """The volume's own voxels and IJK-to-RAS geometry (its parent transforms ignored) as a library Image."""
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        array = slicer.util.arrayFromVolume(volumeNode)
        return slicer_bridge.image_from_volume_array(array, slicer.util.arrayFromVTKMatrix(matrix))

    @contextlib.contextmanager
    def inputVolume(self, volumeNode, ownTransform=None):
        """The node whose own voxels and geometry are the volume in the frame the registration works in.

        Under no transform or only the module's own (ownTransform; e.g. the moving volume at a second Register)
        that is the volume itself. Under another transform (Slicer's DICOM reader puts a tilted or unevenly
        spaced CT under a regularisation transform) it is a temporary copy, hardened (resampled when the
        transform is not linear), removed on leaving; lastMessage says so. The module's own transform above the
        other one is left out of the hardening; the copy then sits under it as the volume does, so a segmentation
        exported against the copy meets the same transforms as against the volume, less the other one.
        """
        if volumeNode is None:
            raise IkrError("no volume selected")
        chain = self._transformChain(volumeNode)
        ownId = ownTransform.GetID() if ownTransform is not None else None
        if slicer_bridge.transform_action([t.GetID() for t in chain], ownId) == "direct":
            yield volumeNode
            return
        top = next((t for t in chain if ownId is not None and t.GetTransformNodeID() == ownId), None)
        copy = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, volumeNode, "IKR temporary copy")
        try:
            if top is not None:
                top.SetAndObserveTransformNodeID(None)  # the module's own transform is not part of the input
            copy.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            copy.HardenTransform()
            if top is not None:  # back under the module's transform, as the volume: exports see the same relations
                top.SetAndObserveTransformNodeID(ownId)
                copy.SetAndObserveTransformNodeID(ownId)
            note = f"{volumeNode.GetName()!r} is under transform {chain[0].GetName()!r}: a hardened copy was registered"
            self.runLog.say(note)
            self.lastMessage = note
            yield copy
        finally:
            if top is not None:
                top.SetAndObserveTransformNodeID(ownId)
            slicer.mrmlScene.RemoveNode(copy)

    def imageFromVolume(self, volumeNode, ownTransform=None) -> Image:
        """The volume as a library Image (LPS) in the frame the registration works in (see inputVolume)."""
        with self.inputVolume(volumeNode, ownTransform) as node:
            return self._volumeImage(node)

    def inputMask(self, segmentationNode, volumeNode, ownTransform=None) -> Image | None:
        """A segmentation as a mask on the grid of imageFromVolume(volumeNode) (None without a segmentation)."""
        if segmentationNode is None:
            return None
        with self.inputVolume(volumeNode, ownTransform) as node:
            return self.maskFromSegmentation(segmentationNode, node)

    @staticmethod
    def maskFromSegmentation(segmentationNode, referenceVolume) -> Image | None:
        """The union of every segment as a uint8 mask on the reference volume's own grid (None without a node).

        Slicer exports through the transforms between the segmentation and the volume: none when both sit
        under the module's transform (drawn on the moving CT before registration: see
        putMovingSegmentationsUnderTransform), the inverse registration when the segmentation was drawn in
        the registered (fixed) frame. Either way the mask is in the volume's own (moving-CT) frame.
        """
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
        """Register moving to fixed (into the output folder when one is set), then show the transform, the moved
        volume, the correspondences and the quality verdict (parameter `qualitySummary`).

        `progress(fraction, message)` may raise to cancel; the workspace also calls it between the steps after
        the registration (map, output writing), so Cancel is seen there too. A registration that was computed
        but could not be written is still shown (the error says why it was not written). The run log gets the
        steps with their times, the library's messages, the verdict with its reasons and the timing.
        """
        p = parameterNode
        fixedName = p.fixedVolume.GetName() if p.fixedVolume is not None else "?"
        movingName = p.movingVolume.GetName() if p.movingVolume is not None else "?"
        self.runLog.begin(f"Register {movingName!r} to {fixedName!r} ({p.device}, {float(p.spacingMm):g} mm grid)")

        def step(fraction: float, message: str) -> None:
            """Log the step, then pass it on (the caller's callback may cancel)."""
            self.runLog.progress(fraction, message)
            if progress is not None:
                progress(fraction, message)

        try:
            self._register(p, step)
        except RegistrationCancelled:
            self.runLog.end("cancelled")
            raise
        except Exception as err:
            self.runLog.end(f"failed: {err}")
            raise
        self.runLog.end("done")

    def _register(self, parameterNode, progress) -> None:
        """The registration itself (see register)."""
        from ImplicitKernelRegistrationLib.workspace import Workspace

        p = parameterNode
        self.lastMessage = ""
        own = p.outputTransform
        with self.inputVolume(p.fixedVolume, own) as fixedNode, self.inputVolume(p.movingVolume, own) as movingNode:
            fixed, moving = self._volumeImage(fixedNode), self._volumeImage(movingNode)
            fixedMask = self.maskFromSegmentation(p.fixedMask, fixedNode)
            movingMask = self.maskFromSegmentation(p.movingMask, movingNode)
        config = {"spacing_mm": float(p.spacingMm), "device": p.device}  # shipped weights: resources
        note = self.lastMessage  # e.g. that a hardened copy was registered
        self.lastMessage = "nothing was changed"
        initial = self.initialAlignment(p)
        workspace = Workspace(self.outputFolder(p), command="ImplicitKernelRegistration", say=self.runLog.say)
        inputs = {"fixed": p.fixedVolume.GetName(), "moving": p.movingVolume.GetName()}
        try:
            workspace.register(
                fixed, moving, config, fixed_mask=fixedMask, moving_mask=movingMask, initial=initial,
                inputs=inputs, overwrite=True, progress=progress,
            )  # fmt: skip
        finally:
            if workspace.has_registration:
                self._showRegistration(p, workspace)
        report = workspace.report
        for line in slicer_bridge.registration_lines(report):
            self.runLog.say(line)
        if report.get("device_note"):
            self.runLog.warn(report["device_note"])
        quality = workspace.quality
        self.runLog.verdict(quality)
        reasons = f" ({'; '.join(quality['reasons'])})" if quality["reasons"] else ""
        self.lastMessage = (
            f"registered in {report['runtime_s']:.0f} s on {report['device']}; quality {quality['verdict']}{reasons}"
            + (f"; {note}" if note else "")
        )

    def _showRegistration(self, parameterNode, workspace) -> None:
        """Hold a new registration: the transform, correspondences, pair lists, scene session, layout and map."""
        p = parameterNode
        foregroundBefore = self._foregroundBefore  # what the expected-error overlay covers, kept across runs
        self.reset()
        self._foregroundBefore = foregroundBefore
        self.workspace = workspace
        self.lastMessage = "the registration is shown; the output folder was not written"
        p.qualitySummary = slicer_bridge.quality_summary(workspace.quality)
        self.showField(p)
        self.showCorrespondences(p)
        self.ensurePairNodes(p)
        self._syncListsToSession(p)  # points of an earlier registration's pairs are removed
        self.storeSessionInScene(p)
        self.showReviewLayout(p)
        self._afterFieldChange(p, compute=True)  # the map the registration computed, into its node

    @staticmethod
    def outputFolder(parameterNode) -> pathlib.Path | None:
        """The chosen output folder (None when none is set)."""
        folder = parameterNode.outputFolder
        return pathlib.Path(folder) if folder and str(folder) not in ("", ".") else None

    def ensureOutputTransform(self, parameterNode):
        """The module's grid transform node (made on first use)."""
        p = parameterNode
        if p.outputTransform is None:
            p.outputTransform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", TRANSFORM_NAME)
        return p.outputTransform

    def putUnderOwnTransform(self, node, ownTransform) -> None:
        """Put a node under the module's transform: directly, or its topmost other transform under it."""
        chain = self._transformChain(node)
        if ownTransform.GetID() in [t.GetID() for t in chain]:
            return
        (chain[-1] if chain else node).SetAndObserveTransformNodeID(ownTransform.GetID())

    def putMovingSegmentationsUnderTransform(self, parameterNode) -> list[str]:
        """When the moving volume first goes under the module's transform, the segmentations drawn on it follow.

        Which ones: slicer_bridge.segmentations_following_moving. Returns their node IDs.
        """
        p = parameterNode
        own = p.outputTransform
        if own.GetID() in [t.GetID() for t in self._transformChain(p.movingVolume)]:
            return []
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        candidates = [
            (node.GetID(), node.GetTransformNodeID(), node.GetNodeReferenceID(role))
            for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
        ]
        chosen = {node.GetID() for node in (p.tumourSegmentation, p.movingMask) if node is not None}
        follow = slicer_bridge.segmentations_following_moving(
            p.movingVolume.GetTransformNodeID(), candidates, p.movingVolume.GetID(), chosen
        )
        for nodeId in follow:
            self.putUnderOwnTransform(slicer.mrmlScene.GetNodeByID(nodeId), own)
        return follow

    def displaySpacingMm(self, parameterNode) -> float:
        """The grid spacing of the transform Slicer is given: the registration's working spacing."""
        config = self.workspace.saved.get("config", {}) if self.workspace is not None else {}
        return float(config.get("spacing_mm", parameterNode.spacingMm))

    def showField(self, parameterNode) -> None:
        """Put the session's field (working grid, float32) into the module's transform; apply it to the moving side.

        A new vtkOrientedGridTransform is set every time (grid geometry and values), so the views and the
        point lists under it refresh; Modified() is called for observers of the transform object itself.
        """
        p = parameterNode
        node = self.ensureOutputTransform(p)
        field = slicer_bridge.display_field(self.workspace.field, self.displaySpacingMm(p))
        transform = slicer.vtkOrientedGridTransform()
        transform.SetInterpolationModeToLinear()
        transform.SetGridDirectionMatrix(slicer_bridge.grid_direction_matrix(field))
        transform.SetDisplacementGridData(slicer_bridge.displacement_image_data(field))
        transform.Modified()
        node.SetAndObserveTransformFromParent(transform)  # fixed -> moving is the resampling direction
        if p.resampleMoving:
            if p.movingVolume.GetTransformNodeID() == node.GetID():
                p.movingVolume.SetAndObserveTransformNodeID(None)
            self._resampleMoving(p)
        else:
            self.putMovingSegmentationsUnderTransform(p)
            self.putUnderOwnTransform(p.movingVolume, node)

    def _resampleMoving(self, parameterNode) -> None:
        """Write the moving volume resampled onto the fixed grid into the output volume node (with a display node)."""
        p = parameterNode
        warped = self.workspace.warped_moving()
        ijkToRas = slicer_bridge.ijk_to_ras_matrix(warped.geometry)
        if p.outputVolume is None:
            p.outputVolume = slicer.util.addVolumeFromArray(
                warped.array, ijkToRAS=ijkToRas, name="IKR moving resampled"
            )
        else:
            slicer.util.updateVolumeFromArray(p.outputVolume, warped.array)
            p.outputVolume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
        if p.outputVolume.GetDisplayNode() is None:
            p.outputVolume.CreateDefaultDisplayNodes()

    @staticmethod
    def showReviewLayout(parameterNode) -> None:
        """Three linked axial views: fixed | moving (registered: under the transform, or its resampled copy) | fused.

        Points for pairs are clicked in the first two; the third fades the registered moving CT over the fixed.
        Nothing happens without Slicer's main window (e.g. a test run without GUI).
        """
        p = parameterNode
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        layoutNode = layoutManager.layoutLogic().GetLayoutNode()
        if not layoutNode.IsLayoutDescription(slicer_bridge.REVIEW_LAYOUT_ID):
            layoutNode.AddLayoutDescription(slicer_bridge.REVIEW_LAYOUT_ID, slicer_bridge.review_layout_xml())
        layoutManager.setLayout(slicer_bridge.REVIEW_LAYOUT_ID)
        moving = p.outputVolume if p.resampleMoving else p.movingVolume
        layers = {
            "Red": (p.fixedVolume, None, 0.0),
            "Yellow": (moving, None, 0.0),
            "Green": (p.fixedVolume, moving, 0.5),
        }
        for tag, (background, foreground, opacity) in layers.items():
            composite = layoutManager.sliceWidget(tag).mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(background.GetID())
            composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
            composite.SetForegroundOpacity(opacity)
            composite.SetLinkedControl(True)

    def showCorrespondences(self, parameterNode) -> None:
        """The automatic correspondences' fixed points as a locked point list, hidden until asked for."""
        p = parameterNode
        corr = self.workspace.correspondences()
        points = lps_ras(corr.fixed_lps[corr.confidence > 0])
        if p.correspondences is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "IKR correspondences")
            node.SetAttribute(slicer_bridge.ROLE_ATTRIBUTE, "correspondences")  # before the selectors see it
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetPointLabelsVisibility(False)
            node.SetDisplayVisibility(False)  # 2000 points would hide the anatomy; the check box shows them
            p.correspondences = node
        slicer.util.updateMarkupsControlPointsFromArray(p.correspondences, points)
        p.correspondences.SetLocked(True)

    @staticmethod
    def markOwnLists(parameterNode) -> None:
        """Mark the module's own point lists with their role (slicer_bridge.ROLE_ATTRIBUTE, saved with the scene), so
        the fixed and moving point selectors leave them out."""
        p = parameterNode
        for node, role in ((p.correspondences, "correspondences"), (p.suggestedClicks, "suggestions")):
            if node is not None and node.GetAttribute(slicer_bridge.ROLE_ATTRIBUTE) != role:
                node.SetAttribute(slicer_bridge.ROLE_ATTRIBUTE, role)

    @staticmethod
    def setCorrespondencesVisible(parameterNode, visible: bool) -> None:
        """Show or hide the automatic correspondences."""
        if parameterNode.correspondences is not None:
            parameterNode.correspondences.SetDisplayVisibility(bool(visible))

    # ------------------------------------------------------------------------------ refinement

    def ensurePairNodes(self, parameterNode) -> None:
        """Make the fixed and moving point lists; the moving one sits under the module's transform in both modes.

        Under the transform, a point placed where the registered moving CT (or its resampled copy) shows a
        structure is stored at that structure's moving-CT position.
        """
        p = parameterNode
        if p.fixedPoints is None:
            p.fixedPoints = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "IKR fixed points")
        if p.movingPoints is None:
            p.movingPoints = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "IKR moving points")
        p.movingPoints.SetAndObserveTransformNodeID(self.ensureOutputTransform(p).GetID())

    @staticmethod
    def _listPoints(markupsNode) -> list:
        """The placed control points (ID, node-coordinate RAS position), in list order."""
        points = []
        for i in range(markupsNode.GetNumberOfControlPoints()):
            if markupsNode.GetNthControlPointPositionStatus(i) != slicer.vtkMRMLMarkupsNode.PositionDefined:
                continue
            position = np.asarray(markupsNode.GetNthControlPointPosition(i), dtype=np.float64)
            points.append(slicer_bridge.ListPoint(markupsNode.GetNthControlPointID(i), position))
        return points

    def hasSession(self, parameterNode) -> bool:
        """Whether a registration is in memory or can be reopened (scene or output folder)."""
        from ImplicitKernelRegistrationLib.workspace import is_registration_folder

        p = parameterNode
        return self.workspace is not None or p.sessionState is not None or is_registration_folder(self.outputFolder(p))

    def storeSessionInScene(self, parameterNode) -> None:
        """Keep what reopening the session needs in a text node saved with the scene (parameter `sessionState`)."""
        p = parameterNode
        saved, automatic = self.workspace.state()
        if p.sessionState is None:
            p.sessionState = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode", "IKR session")
        p.sessionState.SetText(slicer_bridge.session_state_json(saved, automatic))

    def openSession(self, parameterNode) -> None:
        """Reopen the registration when none is in memory: from the scene, else from the output folder."""
        if self.workspace is not None:
            return
        from ImplicitKernelRegistrationLib.workspace import Workspace, is_registration_folder

        p = parameterNode
        folder = self.outputFolder(p)
        fromScene = p.sessionState is not None and p.sessionState.GetText()
        if not fromScene and not is_registration_folder(folder):
            raise IkrError("register first (or choose the output folder of an earlier registration)")
        fixed = self.imageFromVolume(p.fixedVolume, p.outputTransform)
        moving = self.imageFromVolume(p.movingVolume, p.outputTransform) if p.movingVolume is not None else None
        if fromScene:
            saved, automatic = slicer_bridge.session_state_from_json(p.sessionState.GetText())
            workspace = Workspace.from_state(saved, automatic, fixed, moving, folder)
        else:
            workspace = Workspace.open(folder, fixed, moving, command="ImplicitKernelRegistration", say=logging.info)
        workspace.ensure_session()
        self.workspace = workspace

    def pairFeedback(self) -> list[dict]:
        """Per pair: id, label, residual and warnings (empty without a registration)."""
        return self.workspace.feedback() if self.workspace is not None else []

    @staticmethod
    def _deletePoints(markupsNode, pointIds) -> None:
        """Delete control points of one list by ID (IDs are unique within a list only)."""
        for pointId in pointIds:
            index = markupsNode.GetNthControlPointIndexByID(pointId)
            if index >= 0:
                markupsNode.RemoveNthControlPoint(index)

    def syncPairs(self, parameterNode) -> list[int]:
        """Bring the session in line with the point lists (pairs by stored point IDs); return the new pair ids.

        A fixed point and the next moving point placed make a pair; a dragged point moves its pair; a point
        deleted in the Markups module deletes its pair (and its partner). A point waiting for its partner stays.
        """
        p = parameterNode
        self.openSession(p)
        self.ensurePairNodes(p)
        links = slicer_bridge.links_from_json(p.pairLinks)
        pairs = {pair.id: (pair.fixed_lps, pair.moving_lps) for pair in self.workspace.pairs}
        edits = slicer_bridge.reconcile_pairs(
            links, self._listPoints(p.fixedPoints), self._listPoints(p.movingPoints), pairs
        )
        if edits.empty:
            return []
        outside = ~self.workspace.fixed.geometry.contains_lps(edits.add_fixed_lps) if len(edits.add_fixed_lps) else []
        if np.any(outside):
            raise IkrError(
                f"fixed point {edits.add_fixed_lps[outside][0].round(1).tolist()} (LPS mm) lies outside the fixed image"
            )
        start = time.perf_counter()
        try:
            ids = self.workspace.edit_pairs(  # one undo step: a dragged point is one step, not a delete and an add
                remove=edits.remove, move=edits.move, add=(edits.add_fixed_lps, edits.add_moving_lps)
            )
        except IkrError:  # e.g. a point dragged out of the fixed image: the lists follow what the session kept
            self._syncListsToSession(p)
            self._afterEdit(p)
            raise
        for pairId in edits.remove:
            links.pop(pairId, None)
        links.update(zip(ids, edits.add_links, strict=True))
        p.pairLinks = slicer_bridge.links_to_json(links)
        self._editLists(p, edits.delete_fixed, edits.delete_moving)
        self._afterEdit(p)
        changes = {"added": ids, "moved": sorted(edits.move), "deleted": edits.remove}
        self.runLog.say(slicer_bridge.pair_edit_line(changes, time.perf_counter() - start, self.pairFeedback()))
        return ids

    def removePair(self, parameterNode, pairId: int) -> None:
        """Delete one pair by id (and its two points) and rebuild the field."""
        self.openSession(parameterNode)
        start = time.perf_counter()
        self.workspace.remove_pair(pairId)
        self._syncListsToSession(parameterNode)
        self._afterEdit(parameterNode)
        self.runLog.say(
            slicer_bridge.pair_edit_line({"deleted": [pairId]}, time.perf_counter() - start, self.pairFeedback())
        )

    def undo(self, parameterNode) -> None:
        """Undo the last change of the pairs: one add, delete or drag (one syncPairs) is one step; the lists follow
        (points of an undone add are deleted, an undone drag puts its points back)."""
        self.openSession(parameterNode)
        start = time.perf_counter()
        before = {q.id: (q.fixed_lps.copy(), q.moving_lps.copy()) for q in self.workspace.pairs}
        self.workspace.undo()
        after = {q.id: (q.fixed_lps, q.moving_lps) for q in self.workspace.pairs}
        self._syncListsToSession(parameterNode)
        self._afterEdit(parameterNode)
        moved = [
            i for i in sorted(set(before) & set(after))
            if not all(np.array_equal(a, b) for a, b in zip(before[i], after[i], strict=True))
        ]  # fmt: skip
        changes = {"removed": sorted(set(before) - set(after)), "restored": sorted(set(after) - set(before)),
                   "moved back": moved}  # fmt: skip
        seconds = time.perf_counter() - start
        self.runLog.say(slicer_bridge.pair_edit_line(changes, seconds, self.pairFeedback(), action="undo"))

    def _editLists(self, parameterNode, deleteFixed, deleteMoving) -> None:
        """Delete points and label every linked point with its pair's label (observers ignore these edits)."""
        p = parameterNode
        self.editingLists = True
        try:
            self._deletePoints(p.fixedPoints, deleteFixed)
            self._deletePoints(p.movingPoints, deleteMoving)
            labels = {pair.id: pair.label for pair in self.workspace.pairs}
            for pairId, (fixedId, movingId) in slicer_bridge.links_from_json(p.pairLinks).items():
                for node, pointId in ((p.fixedPoints, fixedId), (p.movingPoints, movingId)):
                    index = node.GetNthControlPointIndexByID(pointId)
                    if index >= 0 and pairId in labels:
                        node.SetNthControlPointLabel(index, labels[pairId])
        finally:
            self.editingLists = False

    def _syncListsToSession(self, parameterNode) -> None:
        """After the session changed by itself (delete, undo, reopen): remove points of gone pairs, add missing ones,
        put back the points of a pair whose drag was undone (slicer_bridge.sync_lists_to_session)."""
        p = parameterNode
        self.ensurePairNodes(p)
        pairs = {pair.id: pair for pair in self.workspace.pairs}
        sync = slicer_bridge.sync_lists_to_session(
            slicer_bridge.links_from_json(p.pairLinks),
            self._listPoints(p.fixedPoints),
            self._listPoints(p.movingPoints),
            {k: (v.fixed_lps, v.moving_lps) for k, v in pairs.items()},
        )
        links = sync.links
        self.editingLists = True
        try:
            self._deletePoints(p.fixedPoints, sync.delete_fixed)
            self._deletePoints(p.movingPoints, sync.delete_moving)
            for pairId, positions in sync.move_back.items():
                for node, pointId, ras in zip((p.fixedPoints, p.movingPoints), links[pairId], positions, strict=True):
                    index = node.GetNthControlPointIndexByID(pointId)
                    if index >= 0:
                        node.SetNthControlPointPosition(index, *(float(v) for v in ras))
            for pairId in sync.missing:
                pair = pairs[pairId]
                fixedIndex = p.fixedPoints.AddControlPoint(*lps_ras(pair.fixed_lps), pair.label)
                movingIndex = p.movingPoints.AddControlPoint(*lps_ras(pair.moving_lps), pair.label)
                links[pairId] = (
                    p.fixedPoints.GetNthControlPointID(fixedIndex),
                    p.movingPoints.GetNthControlPointID(movingIndex),
                )
        finally:
            self.editingLists = False
        p.pairLinks = slicer_bridge.links_to_json(links)
        self._editLists(p, [], [])

    def jumpToPair(self, pairId: int) -> None:
        """Centre every slice view on a pair's fixed point."""
        pairs = self.workspace.pairs if self.workspace is not None else []
        pair = next((q for q in pairs if q.id == pairId), None)
        if pair is not None:
            self.jumpToPoint(pair.fixed_lps)

    def _afterEdit(self, parameterNode) -> None:
        """Update the transform, keep the session with the scene and in the output folder, refresh the map."""
        p = parameterNode
        self.showField(p)
        self.storeSessionInScene(p)
        self.saveSession(p)
        self._afterFieldChange(p, compute=bool(p.showExpectedError))

    def saveSession(self, parameterNode) -> None:
        """Save the pairs into the output folder when it holds this registration (workspace.save_pairs, locked)."""
        if self.workspace is not None:
            self.workspace.save_pairs()

    # ------------------------------------------------------------------------------ expected error, suggestions

    def _afterFieldChange(self, parameterNode, compute: bool) -> None:
        """The field changed: the expected-error map is stale; recompute it when `compute` (see updateExpectedError).

        A failure here (e.g. a session of an older version without the kernel's key set) only logs a warning:
        the registration or the edit itself has succeeded.
        """
        p = parameterNode
        if compute:
            try:
                self.updateExpectedError(p)
            except IkrError as err:
                self.runLog.warn(f"the expected-error map was not updated: {err}")
        if p.showExpectedError and p.expectedErrorVolume is not None:
            self.setExpectedErrorVisible(p, True)  # the resampled moving volume may have taken the foreground

    def updateExpectedError(self, parameterNode) -> Image:
        """The expected registration error (mm, fixed grid) of the current session, also in its volume node.

        The map is the workspace's (review.uncertainty.expected_error_map of the session): one kernel pass
        over the keys plus a resampling onto the fixed grid (about a tenth of a registration's time; each
        clicked pair adds a blend over the whole fixed grid). So that clicking pairs stays fast it is computed:
        - after every registration (it is also written to the output folder as uncertainty.nii.gz);
        - after a refinement edit (add, delete, undo) only while *Show expected error* is on;
        - otherwise here, on demand, when something needs it and the map is stale: turning the overlay
          on, *Suggest where to click*, *Compute margins* (the margin's interval).
        The node "IKR expected error (mm)" (parameter `expectedErrorVolume`) is made once and reused; it is
        not put into the slice views here (see setExpectedErrorVisible).
        """
        p = parameterNode
        self.openSession(p)
        error = self.workspace.expected_error()  # computed again only after an edit
        if error is not self.shownErrorMap or p.expectedErrorVolume is None:
            self._writeExpectedErrorNode(p, error)
            self.shownErrorMap = error
        return error

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
        display.SetThreshold(EXPECTED_ERROR_THRESHOLD_MM, 1.0e6)
        display.SetApplyThreshold(1)  # below the threshold the overlay is transparent

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
        if self.workspace is not None or p.expectedErrorVolume is None:
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
        p = parameterNode
        if p.tumourSegmentation is not None:
            tumour = self.inputMask(p.tumourSegmentation, p.movingVolume, p.outputTransform)  # on the moving CT
            return self.workspace.to_fixed(tumour)
        if p.ablationSegmentation is not None:
            return self.inputMask(p.ablationSegmentation, p.fixedVolume, p.outputTransform)
        return None

    def suggestClicks(self, parameterNode, n: int | None = None) -> np.ndarray:
        """Fixed-space points (LPS, (k, 3), k <= n) where one clicked pair would remove the most expected error.

        Workspace.suggest on the current map, inside the body of the fixed CT (as `ikr suggest`)
        and near suggestionMask(). The points replace those of the "IKR suggested clicks" list (parameter
        `suggestedClicks`), labelled with the expected error there; the slice views jump to the first.
        """
        p = parameterNode
        self.updateExpectedError(p)  # opens the session (and reads the fixed CT) when needed; shows the map
        n = int(p.numberOfSuggestions if n is None else n)
        suggestions = self.workspace.suggest(n, near_mask=self.suggestionMask(p))
        points, values = suggestions.points_lps, suggestions.expected_error_mm
        if len(points) == 0:
            raise IkrError("no place was found where a clicked pair would reduce the expected error")
        if p.suggestedClicks is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", SUGGESTIONS_NAME)
            node.SetAttribute(slicer_bridge.ROLE_ATTRIBUTE, "suggestions")  # before the selectors see it
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor(*SUGGESTIONS_COLOR)
            p.suggestedClicks = node
        slicer.util.updateMarkupsControlPointsFromArray(p.suggestedClicks, lps_ras(points))
        for i, value in enumerate(values):
            p.suggestedClicks.SetNthControlPointLabel(i, f"click {i + 1}: {value:.1f} mm")
        p.suggestedClicks.SetLocked(True)
        self.jumpToPoint(points[0])
        self.runLog.say(
            f"{len(points)} suggested clicks, expected error there "
            + ", ".join(f"{v:.1f}" for v in values) + " mm"
        )  # fmt: skip
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
        from ImplicitKernelRegistrationLib.workspace import Workspace

        p = parameterNode
        if p.tumourSegmentation is None or p.ablationSegmentation is None:
            raise IkrError("choose the tumour and the ablation-zone segmentations")
        if self.workspace is None and self.hasSession(p):
            self.openSession(p)
        tumour = self.inputMask(p.tumourSegmentation, p.movingVolume, p.outputTransform)
        ablation = self.inputMask(p.ablationSegmentation, p.fixedVolume, p.outputTransform)
        review = (self.workspace or Workspace()).margin(tumour, ablation)  # no registration: as they lie
        self.marginReview = review
        r = review.result
        poly = slicer_bridge.margin_polydata_ras(r.surface.points_lps, r.surface.triangles, r.margins_mm)
        if p.marginModel is None:
            p.marginModel = slicer.modules.models.logic().AddModel(poly)
            p.marginModel.SetName("IKR tumour margin")
        else:
            p.marginModel.SetAndObservePolyData(poly)
        display = p.marginModel.GetDisplayNode()
        display.SetActiveScalar("margin_mm", vtk.vtkAssignAttribute.POINT_DATA)
        display.SetAndObserveColorNodeID(self.marginColorNode(p).GetID())
        display.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseManualScalarRange)
        display.SetScalarRange(*slicer_bridge.MARGIN_TABLE_RANGE_MM)
        display.SetScalarVisibility(True)
        display.SetVisibility2D(True)
        if slicer.modules.colors.logic().GetColorLegendDisplayNode(p.marginModel) is None:
            legend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(p.marginModel)
            legend.SetTitleText("Margin (mm)")
        figures = r.figures()
        summary = (
            f"minimal margin {figures['min_margin_mm']:.1f} mm, coverage {figures['coverage_percent']:.1f} %, "
            f"tumour outside the zone {figures['outside_volume_ml']:.2f} ml"
        )
        if self.workspace is not None:
            summary += "\n" + self._marginIntervalLine(review)
        p.marginSummary = summary
        for line in summary.splitlines():
            self.runLog.say(line)
        return review.figures()

    @staticmethod
    def marginColorNode(parameterNode):
        """The clinical margin colour table (red < 0 mm, yellow 0-5 mm, green >= 5 mm), made on first use."""
        p = parameterNode
        if p.marginColors is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", MARGIN_COLOR_NAME)
            node.SetTypeToUser()
            table = slicer_bridge.margin_color_table()
            node.SetNumberOfColors(len(table))
            for i, (name, rgb) in enumerate(table):
                node.SetColor(i, name, *rgb, 1.0)
            p.marginColors = node
        return p.marginColors

    def _marginIntervalLine(self, review) -> str:
        """The summary line of the minimal margin's 5-95 % interval (or why it is not available)."""
        interval = review.interval
        if interval is None:
            self.runLog.warn(f"no margin interval: {review.interval_problem}")
            return f"minimal margin 5-95 %: not available ({review.interval_problem})"
        return (
            f"minimal margin 5-95 %: {interval['min_margin_p5_mm']:.1f} .. {interval['min_margin_p95_mm']:.1f} mm; "
            f"P(<0 mm) {interval['p_min_margin_below_0mm']:.2f}, P(<5 mm) {interval['p_min_margin_below_5mm']:.2f}"
        )

    def jumpToMinimalMargin(self) -> None:
        """Centre every slice view on the point of minimal margin."""
        if self.marginReview is None:
            raise IkrError("compute the margins first")
        self.jumpToPoint(self.marginReview.result.min_margin_point_lps)

    def saveMarginReport(self, parameterNode, outdir) -> pathlib.Path:
        """Write report.html, margin.json, margin_points.csv, the surface and the warped tumour (all or nothing).

        With a margin interval (computed with the margins), margin.json carries its figures and the report
        its row and the expected error's isolines, as `ikr margin --uncertainty` writes them.
        """
        from ImplicitKernelRegistrationLib.workspace import Workspace

        if self.marginReview is None:
            raise IkrError("compute the margins first")
        p = parameterNode
        inputs = {
            "tumour": p.tumourSegmentation.GetName(),
            "ablation": p.ablationSegmentation.GetName(),
            "transform": "refinement session" if self.workspace is not None else "identity (none)",
        }
        if self.marginReview.interval is not None:
            inputs["uncertainty"] = "expected-error map of the refinement session"
        background = self.imageFromVolume(p.fixedVolume, p.outputTransform)
        Workspace.write_margin_review(outdir, self.marginReview, inputs, background)
        self.runLog.say(f"margin report written to {outdir}")
        return pathlib.Path(outdir)

    # ------------------------------------------------------------------------------ export

    def exportTransform(self, parameterNode, path) -> pathlib.Path:
        """Save the current field: .h5/.tfm as an ITK transform, .nrrd/.mha as a displacement image (not NIfTI).

        slicer_bridge.transform_export_kind says why a NIfTI field is refused (Slicer warns on its intent code).
        """
        slicer_bridge.transform_export_kind(path)  # refuses NIfTI and unknown suffixes, with advice
        self.openSession(parameterNode)
        written = self.workspace.export_transform(path)
        self.runLog.say(f"transform written to {written}")
        return written

    def exportWarpedSegmentation(self, parameterNode, segmentationNode, path) -> pathlib.Path:
        """Save a segmentation drawn on the moving volume, warped onto the fixed grid (nearest neighbour).

        .seg.nrrd is written by Slicer itself (slicer.util.saveNode; no slicerio in Slicer), other label
        formats (.nii.gz, .nrrd) by the library.
        """
        if segmentationNode is None:
            raise IkrError("choose a segmentation to export")
        self.openSession(parameterNode)
        mask = self.inputMask(segmentationNode, parameterNode.movingVolume, parameterNode.outputTransform)
        path = pathlib.Path(path)
        name = segmentationNode.GetName()
        if not path.name.lower().endswith(".seg.nrrd"):
            written = self.workspace.export_warped_labels(mask, name, path)
            self.runLog.say(f"warped segmentation {name!r} written to {written}")
            return written

        def saveWithSlicer(labels: Image, temporaryPath: pathlib.Path) -> None:
            """Write the warped labels as a Slicer segmentation (the temporary name keeps the .seg.nrrd suffix)."""
            labelmap = slicer.util.addVolumeFromArray(
                labels.array,
                ijkToRAS=slicer_bridge.ijk_to_ras_matrix(labels.geometry),
                name=f"{name} (registered)",
                nodeClassName="vtkMRMLLabelMapVolumeNode",
            )
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", labelmap.GetName())
            try:
                if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation):
                    raise IkrError("Slicer could not make a segmentation of the warped labels", path)
                if not slicer.util.saveNode(segmentation, str(temporaryPath)):
                    raise IkrError("Slicer could not save the segmentation", path)
            finally:
                slicer.mrmlScene.RemoveNode(labelmap)
                slicer.mrmlScene.RemoveNode(segmentation)

        written = self.workspace.export_warped_labels(mask, name, path, writer=saveWithSlicer)
        self.runLog.say(f"warped segmentation {name!r} written to {written}")
        return written


class ImplicitKernelRegistrationTest(ScriptedLoadableModuleTest):
    """End-to-end self-test inside Slicer on the library's phantom (see runTest for what it covers)."""

    def setUp(self) -> None:
        """Start from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """Run every test (each from an empty scene)."""
        logic = ImplicitKernelRegistrationLogic()
        missing = logic.missingRequirements()
        if missing:
            # Not skipTest: under Reload and Test a skipped test reports failure. Say what is missing and stop.
            self.delayDisplay(f"Not run: the module needs {missing}; install them from the module first", 3000)
            logging.warning("ImplicitKernelRegistration self-test not run: missing %s", missing)
            return
        self.setUp()
        self.test_RegisterRefineMargins()
        self.setUp()
        self.test_ResampleModeAndExports()

    def _addVolume(self, image: Image, name: str):
        """Add a library Image to the scene as a scalar volume."""
        ijkToRas = slicer_bridge.ijk_to_ras_matrix(image.geometry)
        return slicer.util.addVolumeFromArray(image.array, ijkToRAS=ijkToRas, name=name)

    def _addSegmentation(self, mask: Image, name: str, referenceVolume=None):
        """Add a mask as a one-segment segmentation node (through a labelmap volume), drawn on `referenceVolume`."""
        labels = (mask.array >= 0.5).astype(np.uint8)
        ijkToRas = slicer_bridge.ijk_to_ras_matrix(mask.geometry)
        labelmap = slicer.util.addVolumeFromArray(
            labels, ijkToRAS=ijkToRas, name=name, nodeClassName="vtkMRMLLabelMapVolumeNode"
        )
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        if referenceVolume is not None:
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
        slicer.mrmlScene.RemoveNode(labelmap)
        return segmentation

    def _phantomCase(self):
        """A small breathing phantom pair (3 mm) from the library."""
        from ImplicitKernelRegistrationLib.synthetic.phantom import make_phantom
        from ImplicitKernelRegistrationLib.synthetic.synth import make_case

        ct = make_phantom(seed=1, size=(96, 80, 64), spacing_mm=(3.0, 3.0, 3.0))[0]
        return make_case(ct, "breathing", 1)

    def _setUpCase(self, logic, case):
        """Parameter node with the phantom volumes, CPU, 3 mm."""
        p = logic.getParameterNode()
        p.fixedVolume = self._addVolume(case.fixed, "fixed")
        p.movingVolume = self._addVolume(case.moving, "moving")
        p.spacingMm = 3.0
        p.device = "cpu"
        return p

    def test_RegisterRefineMargins(self) -> None:
        """Tumour drawn before and after Register, re-register, one-click pairs by ID, the scene's session."""
        from ImplicitKernelRegistrationLib.core.fields import sample_field, transform_points, warp_labels
        from ImplicitKernelRegistrationLib.synthetic.tumour import demo_tumour_and_zone

        self.delayDisplay("Making a phantom pair; a tumour drawn on the moving CT before registration")
        case = self._phantomCase()
        logic = ImplicitKernelRegistrationLogic()
        p = self._setUpCase(logic, case)
        tumour, zone, trueMargin = demo_tumour_and_zone(case.fixed, case.true_field, None, 1)
        p.tumourSegmentation = self._addSegmentation(tumour, "tumour", p.movingVolume)
        p.ablationSegmentation = self._addSegmentation(zone, "ablation zone", p.fixedVolume)

        self.delayDisplay("Registering")
        logic.register(p)
        self.assertIsNotNone(p.outputTransform)
        self.assertEqual(p.movingVolume.GetTransformNodeID(), p.outputTransform.GetID())
        self.assertEqual(p.tumourSegmentation.GetTransformNodeID(), p.outputTransform.GetID())
        self.assertIsNone(p.ablationSegmentation.GetTransformNodeID())
        self.assertFalse(p.correspondences.GetDisplayVisibility())
        self.assertEqual(p.correspondences.GetAttribute(slicer_bridge.ROLE_ATTRIBUTE), "correspondences")
        self.assertTrue(p.qualitySummary.startswith("Quality: "), p.qualitySummary)  # the verdict, shown
        log = logic.runLog.text()
        for line in ("== Register", "detecting keypoints", "registered in", "quality: ", "== done after"):
            self.assertIn(line, log)
        fixedLps = case.landmarks_fixed_lps[:1]
        expected = lps_ras(transform_points(logic.workspace.field, fixedLps))[0]
        got = p.outputTransform.GetTransformFromParent().TransformPoint(*lps_ras(fixedLps)[0])
        self.assertLess(np.linalg.norm(np.asarray(got) - expected), 0.1)

        self.delayDisplay("Margins of the tumour drawn before registration")
        figures = logic.computeMargins(p)
        self.assertLess(abs(figures["min_margin_mm"] - trueMargin), 3.0)
        self.assertIsNotNone(p.marginModel)
        self.assertEqual(p.marginModel.GetDisplayNode().GetColorNodeID(), p.marginColors.GetID())
        self.assertIsNotNone(slicer.modules.colors.logic().GetColorLegendDisplayNode(p.marginModel))
        self.assertIsNotNone(logic.marginReview.interval, p.marginSummary)
        self.assertLessEqual(figures["min_margin_p5_mm"], figures["min_margin_mm"])
        self.assertLessEqual(figures["min_margin_mm"], figures["min_margin_p95_mm"])

        self.delayDisplay("The same tumour drawn after registration, in the registered views")
        drawnAfter = warp_labels(tumour, logic.workspace.field)
        p.tumourSegmentation = self._addSegmentation(drawnAfter, "tumour drawn after", p.fixedVolume)
        after = logic.computeMargins(p)
        self.assertLess(abs(after["min_margin_mm"] - figures["min_margin_mm"]), 3.0)  # one 3 mm voxel

        self.delayDisplay("Registering again (the moving volume is under the module's transform)")
        logic.register(p)
        self.assertEqual(p.movingVolume.GetTransformNodeID(), p.outputTransform.GetID())
        again = lps_ras(transform_points(logic.workspace.field, fixedLps))[0]
        self.assertLess(np.linalg.norm(again - expected), 0.5)

        self.delayDisplay("One click per point: a fixed point, then its partner")
        target = case.landmarks_moving_lps[:1] + np.array([[2.0, 0.0, 0.0]])
        before = sample_field(logic.workspace.field, fixedLps)[0].copy()
        p.fixedPoints.AddControlPoint(*lps_ras(fixedLps)[0])
        self.assertEqual(logic.syncPairs(p), [])  # waits for its partner, is not deleted
        self.assertEqual(p.fixedPoints.GetNumberOfControlPoints(), 1)
        p.movingPoints.AddControlPoint(*lps_ras(target)[0])
        self.assertEqual(len(logic.syncPairs(p)), 1)
        after = sample_field(logic.workspace.field, fixedLps)[0]
        self.assertGreater(np.linalg.norm(after - before), 0.5)
        self.assertLess(logic.pairFeedback()[0]["residual_mm"], 0.5)

        self.delayDisplay("A dragged point moves its pair; one Undo puts the pair, the field and the point back")
        pairId = logic.workspace.pairs[0].id
        fieldBefore = logic.workspace.field.displacement_mm.copy()
        dragged = fixedLps[0] + np.array([0.0, 0.0, 3.0])
        p.fixedPoints.SetNthControlPointPosition(0, *(float(v) for v in lps_ras(dragged)))
        self.assertEqual(logic.syncPairs(p), [])  # nothing added: the pair moved, keeping its id
        self.assertEqual([q.id for q in logic.workspace.pairs], [pairId])
        np.testing.assert_allclose(logic.workspace.pairs[0].fixed_lps, dragged, atol=1e-3)
        self.assertIn(f"pairs: moved {pairId};", logic.runLog.text())
        logic.undo(p)
        self.assertIn(f"undo: moved back {pairId};", logic.runLog.lines[-1])
        np.testing.assert_array_equal(logic.workspace.field.displacement_mm, fieldBefore)
        np.testing.assert_allclose(logic.workspace.pairs[0].fixed_lps, fixedLps[0], atol=1e-3)
        position = np.asarray(p.fixedPoints.GetNthControlPointPosition(0))
        np.testing.assert_allclose(position, lps_ras(fixedLps)[0], atol=1e-3)  # the point is back too
        p.fixedPoints.SetNthControlPointPosition(0, *(float(v) for v in lps_ras(fixedLps[0] + 5000.0)))
        with self.assertRaises(IkrError):  # dragged out of the fixed image: refused, the point goes back
            logic.syncPairs(p)
        position = np.asarray(p.fixedPoints.GetNthControlPointPosition(0))
        np.testing.assert_allclose(position, lps_ras(fixedLps)[0], atol=1e-3)
        np.testing.assert_array_equal(logic.workspace.field.displacement_mm, fieldBefore)

        self.delayDisplay("A second pair, then the first deleted in the Markups module: the second is kept")
        second = case.landmarks_fixed_lps[1:2]
        p.fixedPoints.AddControlPoint(*lps_ras(second)[0])
        p.movingPoints.AddControlPoint(*lps_ras(case.landmarks_moving_lps[1:2])[0])
        logic.syncPairs(p)
        self.assertEqual(len(logic.workspace.pairs), 2)
        p.fixedPoints.RemoveNthControlPoint(0)
        logic.syncPairs(p)
        self.assertEqual(len(logic.workspace.pairs), 1)
        np.testing.assert_allclose(logic.workspace.pairs[0].fixed_lps, second[0], atol=1e-3)
        self.assertEqual(p.movingPoints.GetNumberOfControlPoints(), 1)  # the deleted point's partner went too
        logic.undo(p)
        self.assertEqual(len(logic.workspace.pairs), 2)
        self.assertEqual(p.fixedPoints.GetNumberOfControlPoints(), 2)

        self.delayDisplay("Expected error and suggested clicks")
        error = logic.updateExpectedError(p)
        self.assertEqual(p.expectedErrorVolume.GetName(), EXPECTED_ERROR_NAME)
        self.assertEqual(slicer.util.arrayFromVolume(p.expectedErrorVolume).shape, case.fixed.array.shape)
        self.assertTrue(np.all(np.isfinite(error.array)) and float(error.array.max()) > 0.0)
        self.assertTrue(p.expectedErrorVolume.GetDisplayNode().GetApplyThreshold())
        logic.setExpectedErrorVisible(p, True)
        logic.setExpectedErrorVisible(p, False)
        p.numberOfSuggestions = 3
        points = logic.suggestClicks(p)
        self.assertTrue(1 <= len(points) <= 3)
        self.assertTrue(np.all(case.fixed.geometry.contains_lps(points)), points)

        self.delayDisplay("The module's own lists are kept out of the fixed and moving point selectors")
        lists = [
            (node.GetID(), node.GetAttribute(slicer_bridge.ROLE_ATTRIBUTE))
            for node in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode")
        ]
        hidden = slicer_bridge.point_selector_hidden_ids(lists, p.movingPoints.GetID())
        own = {p.correspondences.GetID(), p.suggestedClicks.GetID()}
        self.assertEqual(set(hidden), own | {p.movingPoints.GetID()})
        self.assertNotIn(p.fixedPoints.GetID(), hidden)

        self.delayDisplay("The session kept with the scene (no output folder)")
        pairsBefore = [q.to_dict() for q in logic.workspace.pairs]
        logic.reset()
        self.assertTrue(logic.hasSession(p))
        logic.openSession(p)
        self.assertEqual([q.to_dict() for q in logic.workspace.pairs], pairsBefore)
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            self.assertTrue(logic.exportTransform(p, pathlib.Path(folder) / "transform.h5").is_file())
            with self.assertRaises(IkrError):
                logic.exportTransform(p, pathlib.Path(folder) / "field.nii.gz")
            logic.computeMargins(p)
            report = logic.saveMarginReport(p, pathlib.Path(folder) / "margin_report")
            self.assertIn("5th-95th percentile", (report / "report.html").read_text(encoding="utf-8"))
        self.delayDisplay("Test passed")

    def test_ResampleModeAndExports(self) -> None:
        """Resample mode (a displayed output volume, moving points under the transform), a fixed volume under a
        regularisation-like transform (a hardened copy is registered), and both exports."""
        import tempfile

        from ImplicitKernelRegistrationLib.core.fields import transform_points
        from ImplicitKernelRegistrationLib.io.segmentations import read_labels
        from ImplicitKernelRegistrationLib.synthetic.tumour import demo_tumour_and_zone

        case = self._phantomCase()
        logic = ImplicitKernelRegistrationLogic()
        p = self._setUpCase(logic, case)
        p.resampleMoving = True
        tumour, _, _ = demo_tumour_and_zone(case.fixed, case.true_field, None, 2)
        p.tumourSegmentation = self._addSegmentation(tumour, "tumour", p.movingVolume)
        shift = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "regularisation")
        matrix = vtk.vtkMatrix4x4()
        matrix.SetElement(0, 3, 3.0)
        shift.SetMatrixTransformToParent(matrix)
        p.fixedVolume.SetAndObserveTransformNodeID(shift.GetID())
        self.delayDisplay("Registering in resample mode, the fixed volume under a transform")
        logic.register(p)
        self.assertIn("hardened copy", logic.lastMessage)
        self.assertIn("hardened copy", logic.runLog.text())
        self.assertEqual(p.fixedVolume.GetTransformNodeID(), shift.GetID())  # left as Slicer loaded it
        self.assertIsNone(slicer.mrmlScene.GetFirstNodeByName("IKR temporary copy"))
        self.assertIsNone(p.movingVolume.GetTransformNodeID())
        self.assertIsNotNone(p.outputVolume.GetDisplayNode())
        self.assertEqual(p.movingPoints.GetTransformNodeID(), p.outputTransform.GetID())
        # A point placed in the views at fixed position x is stored at its moving position x + d(x).
        fixedLps = case.landmarks_fixed_lps[:1]
        index = p.movingPoints.AddControlPointWorld(*lps_ras(fixedLps)[0])
        stored = np.asarray(p.movingPoints.GetNthControlPointPosition(index))
        expected = lps_ras(transform_points(logic.workspace.field, fixedLps))[0]
        self.assertLess(np.linalg.norm(stored - expected), 0.5)

        self.delayDisplay("Exports")
        with tempfile.TemporaryDirectory() as folder:
            for name in ("tumour.seg.nrrd", "tumour.nii.gz"):
                path = logic.exportWarpedSegmentation(p, p.tumourSegmentation, pathlib.Path(folder) / name)
                labels, _ = read_labels(path) if name.endswith(".nii.gz") else (None, None)
                self.assertTrue(path.is_file(), path)
                if labels is not None:
                    self.assertEqual(labels.array.shape, case.fixed.array.shape)
                    self.assertGreater(int(labels.array.sum()), 0)
            self.assertTrue(logic.exportTransform(p, pathlib.Path(folder) / "field.nrrd").is_file())
        self.delayDisplay("Test passed")
