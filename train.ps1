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
. (Join-Path $Root "scripts\launcher.ps1")

function Show-Usage {
    Write-Host "Usage: .\train.ps1 -Config PRESET.toml [sd-scripts arguments...]"
    Write-Host "Presets:"
    $presets = @(Get-ChildItem -LiteralPath (Join-Path $Root "presets") -Filter "*.toml" -ErrorAction SilentlyContinue)
    if ($presets.Count -eq 0) { Write-Host "  (none found in $Root\presets)" }
    foreach ($preset in $presets) { Write-Host "  presets\$($preset.Name)" }
    Write-Host "Example: .\train.ps1 -Config presets\demo.toml"
}

$hasRest = ($null -ne $Rest) -and (@($Rest).Count -gt 0)
if (-not $Config -and -not $hasRest) {
    Show-Usage
    exit 1
}
Assert-VenvExists $VenvPy

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

$code = 1
$saved = Set-ChildEnvironment $Root
try {
    & $VenvPy -m trainer train @PyArgs
    $code = $LASTEXITCODE
} finally {
    Restore-ChildEnvironment $saved
}
exit $code
