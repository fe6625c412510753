<#
.SYNOPSIS
Train a LoRA:  .\train.ps1 -Config presets\demo.toml [more sd-scripts arguments]

.DESCRIPTION
-Config X becomes --config_file X. Every other argument goes to "python -m trainer train" unchanged
and in order, with the names sd-scripts uses (for example --max_train_steps 100 --output_name "my lora").
The exit code is the trainer's. Run .\setup.ps1 (or setup.cmd) once first.
Notes on PowerShell: 512,768 without quotes is read as a list and is passed on as "512,768"; an empty
string ("") is dropped by Windows PowerShell 5.1, so put such values in the TOML file instead.
#>
[CmdletBinding(PositionalBinding = $false)]
param(
    [string]$Config,
    [Parameter(ValueFromRemainingArguments = $true)]$Rest
)

Set-StrictMode -Version 2
$ErrorActionPreference = "Stop"

$Root = $PSScriptRoot
$VenvPy = Join-Path $Root ".venv\Scripts\python.exe"

function Show-Usage {
    Write-Host "Usage: .\train.ps1 -Config PRESET.toml [sd-scripts arguments...]"
    Write-Host "Presets:"
    $presets = @(Get-ChildItem -LiteralPath (Join-Path $Root "presets") -Filter "*.toml" -ErrorAction SilentlyContinue)
    if ($presets.Count -eq 0) { Write-Host "  (none found in $Root\presets)" }
    foreach ($preset in $presets) { Write-Host "  presets\$($preset.Name)" }
    Write-Host "Example: .\train.ps1 -Config presets\demo.toml"
}

# One argument as the trainer should receive it. PowerShell has already turned 512,768 into a list
# (rejoin it) and 1e-4 into a number (its text form is the same value).
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

$hasRest = ($null -ne $Rest) -and (@($Rest).Count -gt 0)
if (-not $Config -and -not $hasRest) {
    Show-Usage
    exit 1
}
if (-not (Test-Path -LiteralPath $VenvPy)) {
    Write-Host "ERROR: the Python environment is missing ($VenvPy)." -ForegroundColor Red
    Write-Host "Fix: run .\setup.ps1 (or setup.cmd) once, then run this again."
    exit 1
}

$PyArgs = @()
if ($Config) {
    # A preset named relative to the trainer folder works from any current directory.
    $configPath = $Config
    if (-not (Test-Path -LiteralPath $configPath) -and -not [IO.Path]::IsPathRooted($configPath)) {
        $besideScript = Join-Path $Root $configPath
        if (Test-Path -LiteralPath $besideScript) { $configPath = $besideScript }
    }
    $PyArgs += "--config_file"
    $PyArgs += $configPath
}
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
    & $VenvPy -m trainer train @PyArgs
    $code = $LASTEXITCODE
} finally {
    foreach ($name in $saved.Keys) {
        [Environment]::SetEnvironmentVariable($name, $saved[$name], "Process")
    }
}
exit $code
