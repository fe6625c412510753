<#
.SYNOPSIS
Open the trainer's page in your browser:  .\gui.ps1 [--port 7860] [--no_browser]

.DESCRIPTION
Starts "python -m trainer gui", a local web page (http://127.0.0.1:7860, or the next free port) where you
pick a preset for your card, set the model, folders, name and trigger word, check, save and start training,
and follow its progress. Every argument goes to "python -m trainer gui" unchanged and in order; the exit
code is Python's. Ctrl-C in this window closes the page; a training run still going is stopped first and
saves its LoRA so far. Run .\setup.ps1 (or setup.cmd) once first.
#>
[CmdletBinding(PositionalBinding = $false)]
param(
    [Parameter(ValueFromRemainingArguments = $true)]$Rest
)

Set-StrictMode -Version 2
$ErrorActionPreference = "Stop"

$Root = $PSScriptRoot
$VenvPy = Join-Path $Root ".venv\Scripts\python.exe"

# One argument as Python should receive it (see train.ps1: PowerShell turns 7861 into a number and
# a,b into a list; give both back as text).
function ConvertTo-ArgText($Item) {
    if ($Item -is [System.Array]) { return (@($Item | ForEach-Object { [string]$_ }) -join ",") }
    $text = [string]$Item
    # Windows PowerShell 5.1 quotes "D:\my out\" as "D:\my out\" and the child reads the final \" as a
    # quote; a trailing backslash means nothing on a folder path, so drop it there.
    if ($PSVersionTable.PSVersion.Major -lt 7 -and $text -match "\s" -and $text.EndsWith("\")) {
        $text = $text.TrimEnd([char]'\')
    }
    return $text
}

if (-not (Test-Path -LiteralPath $VenvPy)) {
    Write-Host "ERROR: the Python environment is missing ($VenvPy)." -ForegroundColor Red
    Write-Host "Fix: run .\setup.ps1 (or setup.cmd) once, then run this again."
    exit 1
}

$PyArgs = @()
foreach ($item in @($Rest)) {
    if ($null -eq $item) { continue }
    $PyArgs += ConvertTo-ArgText $item
}

# The child gets the repo on PYTHONPATH and UTF-8 I/O (Japanese paths and captions); this window's own
# variables are restored afterwards. No Activate.ps1: the venv's python.exe is enough.
$saved = @{}
foreach ($name in @("PYTHONPATH", "PYTHONUTF8", "PYTHONIOENCODING")) {
    $saved[$name] = [Environment]::GetEnvironmentVariable($name, "Process")
}
$code = 1
try {
    if ($saved["PYTHONPATH"]) { $env:PYTHONPATH = $Root + ";" + $saved["PYTHONPATH"] } else { $env:PYTHONPATH = $Root }
    $env:PYTHONUTF8 = "1"
    $env:PYTHONIOENCODING = "utf-8"
    & $VenvPy -m trainer gui @PyArgs
    $code = $LASTEXITCODE
} finally {
    foreach ($name in $saved.Keys) {
        [Environment]::SetEnvironmentVariable($name, $saved[$name], "Process")
    }
}
exit $code
