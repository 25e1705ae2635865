"""The network sidecar: owns one app's DNS and egress. Never imports docker or kubernetes."""
