# Extra configuration for the throwaway dev server (`stigmer-broker dev up`, the tests).
# `bao server -dev` supplies the in-memory storage, the unsealed core and the listener;
# this file adds what the API cannot: OpenBao only accepts audit devices from config.
# ${audit_log} is filled in with <state dir>/audit.log.
disable_mlock = true
ui            = false

audit "file" "stigmer" {
  options = {
    file_path = "${audit_log}"
  }
}
