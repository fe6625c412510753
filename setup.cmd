@echo off
rem Runs setup.ps1 when PowerShell's execution policy blocks scripts: "-ExecutionPolicy Bypass" applies
rem to this one PowerShell process only; no setting on the machine is changed. Arguments pass through
rem (setup.cmd -Dev -Cpu). Plain ASCII without a BOM: cmd.exe would read a BOM as part of the first command.
powershell -NoProfile -ExecutionPolicy Bypass -File "%~dp0setup.ps1" %*
exit /b %ERRORLEVEL%
