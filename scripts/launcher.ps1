# Shared by setup.ps1, train.ps1 and gui.ps1, which dot-source it. Only functions: loading it runs nothing.
# Windows PowerShell 5.1 and PowerShell 7.

# One argument as Python should receive it. PowerShell has already turned 512,768 into a list (rejoin it)
# and 1e-4 or 7861 into a number (its text form is the same value).
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

# train.ps1 and gui.ps1 need the environment that setup.ps1 makes.
function Assert-VenvExists([string]$VenvPy) {
    if (Test-Path -LiteralPath $VenvPy) { return }
    Write-Host "ERROR: the Python environment is missing ($VenvPy)." -ForegroundColor Red
    Write-Host "Fix: run .\setup.ps1 (or setup.cmd) once, then run this again."
    exit 1
}

# The child gets the repo on PYTHONPATH and UTF-8 I/O (Japanese paths and captions). No Activate.ps1: the
# venv's python.exe is enough. Returns this window's own values for Restore-ChildEnvironment. The python
# call itself stays in each script, at its top level, so the child writes straight to the console.
function Set-ChildEnvironment([string]$Root) {
    $saved = @{}
    foreach ($name in @("PYTHONPATH", "PYTHONUTF8", "PYTHONIOENCODING")) {
        $saved[$name] = [Environment]::GetEnvironmentVariable($name, "Process")
    }
    if ($saved["PYTHONPATH"]) { $env:PYTHONPATH = $Root + ";" + $saved["PYTHONPATH"] } else { $env:PYTHONPATH = $Root }
    $env:PYTHONUTF8 = "1"
    $env:PYTHONIOENCODING = "utf-8"
    return $saved
}

function Restore-ChildEnvironment($Saved) {
    foreach ($name in $Saved.Keys) {
        [Environment]::SetEnvironmentVariable($name, $Saved[$name], "Process")
    }
}
