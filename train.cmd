@echo off
rem Runs train.ps1 when PowerShell's execution policy blocks scripts: "-ExecutionPolicy Bypass" applies
rem to this one PowerShell process only; no setting on the machine is changed. Arguments pass through
rem (train.cmd -Config presets\demo.toml --max_train_steps 100). Plain ASCII without a BOM: cmd.exe
rem would read a BOM as part of the first command.
powershell -NoProfile -ExecutionPolicy Bypass -File "%~dp0train.ps1" %*
exit /b %ERRORLEVEL%
