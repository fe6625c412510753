<#
.SYNOPSIS
Set up trainer on Windows: find Python 3.10-3.12, create .venv next to this script, then install the
torch build for this PC's NVIDIA GPU (or the CPU build) and everything else.

.DESCRIPTION
Run it from PowerShell in the trainer folder:   .\setup.ps1
If PowerShell answers "running scripts is disabled on this system" (the default execution policy on
Windows), run setup.cmd instead (double-click it, or .\setup.cmd). It starts this script with
"-ExecutionPolicy Bypass" for that one PowerShell process only and changes no setting on the machine.
To allow local scripts for your user account for good (an option, never done for you):
    Set-ExecutionPolicy -Scope CurrentUser RemoteSigned
Safe to run again: when nothing changed it finishes in seconds and installs nothing.

.PARAMETER Dev
Also install the test dependencies (pytest, peft, ...).
.PARAMETER Cpu
Install the CPU build of torch even when an NVIDIA GPU is present.
.PARAMETER Force
Reinstall even when nothing changed.
.PARAMETER Python
The Python 3.10-3.12 to build .venv from, as a path to python.exe. Default: the py launcher
(3.12, 3.11, 3.10), then python.exe on PATH (not the Microsoft Store stub).
#>
[CmdletBinding()]
param(
    [switch]$Dev,
    [switch]$Cpu,
    [switch]$Force,
    [string]$Python
)

Set-StrictMode -Version 2
$ErrorActionPreference = "Stop"

# Everything is anchored at this script's folder, so any current directory works (even System32).
$Root = $PSScriptRoot
$Venv = Join-Path $Root ".venv"
$VenvPy = Join-Path $Venv "Scripts\python.exe"
$Supported = @("3.10", "3.11", "3.12")
# Double quotes inside a native argument are mangled by Windows PowerShell 5.1, so the probe uses none.
$ProbeCode = "import sys, struct; print('%d.%d|%d|%s' % (sys.version_info[0], sys.version_info[1], struct.calcsize('P') * 8, sys.executable))"

function Write-Failure([string]$Message) {
    Write-Host $Message -ForegroundColor Red
}

# Runs a Python (a path or a command, plus leading arguments such as "-3.12" for the py launcher) and
# returns @{ Version = "3.11"; Exe = "C:\...\python.exe" } when it is a 64-bit 3.10-3.12, else $null.
function Get-PythonInfo([string]$Command, [string[]]$PreArgs) {
    # Not "Stop" here: a missing version writes to stderr, which Windows PowerShell 5.1 would turn into
    # a terminating error.
    $ErrorActionPreference = "Continue"
    try {
        $out = & $Command @PreArgs -c $ProbeCode 2>$null
        if ($LASTEXITCODE -ne 0 -or $null -eq $out) { return $null }
        $parts = @($out)[-1].ToString().Trim().Split([char]'|', 3)
        if ($parts.Count -ne 3) { return $null }
        if ($Supported -notcontains $parts[0]) { return $null }
        if ($parts[1] -ne "64") {
            Write-Host "  Skipping 32-bit Python $($parts[0]) at $($parts[2]): torch needs 64-bit Python."
            return $null
        }
        return @{ Version = $parts[0]; Exe = $parts[2] }
    } catch {
        return $null
    }
}

function Find-Python {
    if ($Python) {
        $info = Get-PythonInfo $Python @()
        if ($null -eq $info) {
            Write-Failure "ERROR: -Python $Python is not a working 64-bit Python 3.10, 3.11 or 3.12."
        }
        return $info
    }
    # The py launcher: each version is its own argument ("py" "-3.12"), never one program name.
    if (Get-Command py -CommandType Application -ErrorAction SilentlyContinue) {
        foreach ($v in @("3.12", "3.11", "3.10")) {
            $info = Get-PythonInfo "py" @("-$v")
            if ($null -ne $info) { return $info }
        }
    }
    # PATH, minus the Microsoft Store stub in WindowsApps (it opens the Store instead of running Python).
    $names = @("python.exe", "python3.exe")
    $onPath = @(Get-Command -Name $names -CommandType Application -All -ErrorAction SilentlyContinue)
    foreach ($cmd in $onPath) {
        if ($cmd.Source -like "*\WindowsApps\*") { continue }
        $info = Get-PythonInfo $cmd.Source @()
        if ($null -ne $info) { return $info }
    }
    Write-Failure "ERROR: no 64-bit Python 3.10, 3.11 or 3.12 was found (py launcher and PATH were checked)."
    Write-Host "Fix: install Python 3.12 from https://www.python.org/downloads/windows/"
    Write-Host "     (tick 'Add python.exe to PATH'), open a new PowerShell window and run .\setup.ps1 again."
    if (Get-Command winget -ErrorAction SilentlyContinue) {
        Write-Host "     Or install it with:  winget install -e --id Python.Python.3.12"
    }
    Write-Host "     Python already installed elsewhere?  .\setup.ps1 -Python 'C:\path\to\python.exe'"
    return $null
}

# The venv is reused only when its interpreter still runs, is 3.10-3.12, and matches -Python if given
# (a venv whose pyvenv.cfg points at an uninstalled Python is rebuilt, not patched).
function Test-VenvOk {
    if (-not (Test-Path -LiteralPath $VenvPy)) { return $false }
    $have = Get-PythonInfo $VenvPy @()
    if ($null -eq $have) { return $false }
    if ($Python) {
        $want = Get-PythonInfo $Python @()
        if ($null -eq $want -or $want.Version -ne $have.Version) { return $false }
    }
    return $true
}

function New-Venv {
    $py = Find-Python
    if ($null -eq $py) { return $false }
    if (Test-Path -LiteralPath $Venv) {
        if (-not (Test-Path -LiteralPath (Join-Path $Venv "pyvenv.cfg"))) {
            Write-Failure "ERROR: $Venv exists but is not a virtual environment. Move it away and run setup again."
            return $false
        }
        Write-Host "Rebuilding .venv (its Python is missing, not 3.10-3.12, or not the -Python one)..."
        try {
            Remove-Item -LiteralPath $Venv -Recurse -Force
        } catch {
            Write-Failure "ERROR: could not delete the old .venv: $($_.Exception.Message)"
            Write-Host "Fix: close programs that use it (a running training, an editor), then run setup again."
            return $false
        }
    }
    Write-Host "Creating .venv with Python $($py.Version) ($($py.Exe))..."
    & $py.Exe -m venv $Venv
    if ($LASTEXITCODE -ne 0 -or -not (Test-Path -LiteralPath $VenvPy)) {
        Write-Failure "ERROR: creating the virtual environment failed (exit code $LASTEXITCODE)."
        Write-Host "Fix: repair or reinstall Python $($py.Version), or pick another: .\setup.ps1 -Python 'C:\path\to\python.exe'"
        Remove-Item -LiteralPath $Venv -Recurse -Force -ErrorAction SilentlyContinue
        return $false
    }
    return $true
}

# A ZIP downloaded with a browser marks every file as "from the internet" (Mark-of-the-Web), and
# PowerShell then refuses or questions each script. Remove the mark from this folder's own files.
function Unblock-Tree {
    if (-not (Get-Command Unblock-File -ErrorAction SilentlyContinue)) { return }
    $items = @(Get-ChildItem -LiteralPath $Root -Force -ErrorAction SilentlyContinue)
    foreach ($item in $items) {
        if ($item.Name -eq ".venv" -or $item.Name -eq ".git") { continue }
        if ($item.PSIsContainer) {
            Get-ChildItem -LiteralPath $item.FullName -Recurse -File -Force -ErrorAction SilentlyContinue |
                Unblock-File -ErrorAction SilentlyContinue
        } else {
            Unblock-File -LiteralPath $item.FullName -ErrorAction SilentlyContinue
        }
    }
}

function Test-Elevated {
    try {
        $id = [Security.Principal.WindowsIdentity]::GetCurrent()
        $principal = New-Object Security.Principal.WindowsPrincipal($id)
        return $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)
    } catch {
        return $false
    }
}

Write-Host "trainer setup in $Root"
if (Test-Elevated) {
    Write-Warning "Running as Administrator is not needed; files in .venv will then belong to the Administrator."
}
Unblock-Tree
# Loaded after the unblocking: a still-marked helper would be refused under the RemoteSigned policy.
. (Join-Path $Root "scripts\launcher.ps1")

if (-not (Test-VenvOk)) {
    if (-not (New-Venv)) { exit 1 }
}

$setupArgs = @()
if ($Dev) { $setupArgs += "--dev" }
if ($Cpu) { $setupArgs += "--cpu" }
if ($Force) { $setupArgs += "--force" }

$code = 1
$saved = Set-ChildEnvironment $Root
try {
    & $VenvPy -m trainer setup @setupArgs
    $code = $LASTEXITCODE
} finally {
    Restore-ChildEnvironment $saved
}
if ($code -ne 0) {
    Write-Failure "Setup did not finish (exit code $code). The message above says what to do next."
}
exit $code
