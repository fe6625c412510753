@echo off
rem Runs gui.ps1 when PowerShell's execution policy blocks scripts: "-ExecutionPolicy Bypass" applies
rem to this one PowerShell process only; no setting on the machine is changed. Arguments pass through
rem (gui.cmd --port 7861 --no_browser). Plain ASCII without a BOM: cmd.exe would read a BOM as part of
rem the first command.
powershell -NoProfile -ExecutionPolicy Bypass -File "%~dp0gui.ps1" %*
exit /b %ERRORLEVEL%
