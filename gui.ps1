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
. (Join-Path $Root "scripts\launcher.ps1")

Assert-VenvExists $VenvPy

$PyArgs = @()
foreach ($item in @($Rest)) {
    if ($null -eq $item) { continue }
    $PyArgs += ConvertTo-ArgText $item
}

$code = 1
$saved = Set-ChildEnvironment $Root
try {
    & $VenvPy -m trainer gui @PyArgs
    $code = $LASTEXITCODE
} finally {
    Restore-ChildEnvironment $saved
}
exit $code
