// EnvironmentFlags: every flag may also come from `PROGRESS_RELAY_<FLAG>`.
//
// swift-argument-parser reads only the command line, so the environment is
// turned into flags before parsing: a variable is used only when its flag is
// absent from the command line (the command line wins), and a repeatable
// flag's variable holds a comma- (or newline-) separated list.

import Foundation

enum EnvironmentFlags {
    /// How a variable becomes flags: one value, a list (one flag per item), or an on/off switch.
    enum Kind { case single, repeatable, toggle }

    /// The flags of each subcommand that a variable may give; ProgressRelayCommandTests checks
    /// this table against the commands' own flags, so that neither drifts from the other.
    static let flags: [String: [(name: String, kind: Kind)]] = [
        "serve": [
            ("socket", .single), ("socket-mode", .single), ("listen", .single), ("jwt-secret-file", .repeatable),
            ("jwt-public-key-file", .repeatable), ("jwt-kid", .repeatable), ("jwt-audience", .single), ("jwt-issuer", .single),
            ("jwt-leeway", .single), ("grant", .repeatable), ("publish-grant", .repeatable), ("allow-origin", .repeatable),
            ("history", .single), ("max-event-bytes", .single), ("max-outbound-bytes", .single),
            ("max-inflight-bytes", .single), ("max-emitters", .single), ("max-emitters-per-uid", .single),
            ("emitter-idle-timeout", .single), ("emitter-partial-line-timeout", .single),
            ("max-connections", .single), ("max-connections-per-ip", .single), ("trusted-proxy", .repeatable),
            ("handshake-timeout", .single),
            ("ping-interval", .single), ("sse-retry", .single), ("state-file", .single), ("max-topics", .single), ("max-history-bytes", .single),
            ("max-subscriptions", .single), ("max-pattern-subscriptions", .single),
            ("max-pattern-subscriptions-total", .single), ("topic-ttl", .single), ("log-level", .single), ("allow-tokens-without-exp", .toggle),
            ("dev", .toggle), ("redis", .single), ("redis-prefix", .single), ("redis-queue-bytes", .single),
            ("redis-lines-per-call", .single), ("node-name", .single),
        ],
        "emit": [("socket", .single)],
        "token": [("jwt-secret-file", .single)],
        "watch": [("url", .single), ("token-file", .single), ("token", .single)],
    ]

    /// The command line with the variables' flags added, and which flag came from which variable
    /// (`--history` → `PROGRESS_RELAY_HISTORY`), so that an error can name what the user set.
    static func apply(
        to arguments: [String], environment: [String: String] = ProcessInfo.processInfo.environment
    ) -> (arguments: [String], variables: [String: String]) {
        guard let subcommand = arguments.first, let known = flags[subcommand] else { return (arguments, [:]) }
        var result = arguments
        var variables = [String: String]()
        for (name, kind) in known {
            let given = arguments.contains { $0 == "--" + name || $0.hasPrefix("--" + name + "=") }
            let variable = "PROGRESS_RELAY_" + name.uppercased().replacingOccurrences(of: "-", with: "_")
            guard !given, let value = environment[variable], !value.isEmpty else { continue }
            variables["--" + name] = variable
            switch kind {
            case .single:
                result += ["--" + name, value]
            case .repeatable:
                for item in value.split(whereSeparator: { $0 == "," || $0 == "\n" || $0 == "\r\n" }) where !item.trimmingCharacters(in: .whitespaces).isEmpty {
                    result += ["--" + name, item.trimmingCharacters(in: .whitespaces)]
                }
            case .toggle:
                if ["1", "true", "yes", "on"].contains(value.lowercased()) { result.append("--" + name) }
            }
        }
        return (result, variables)
    }

    /// `message` with the variable named, when it speaks of a flag whose value came from one.
    static func attribute(_ message: String, variables: [String: String]) -> String {
        for (flag, variable) in variables.sorted(by: { $0.key.count > $1.key.count }) {
            guard let range = message.range(of: flag) else { continue }
            // `--history` must not match inside `--history-foo`.
            let next = message[range.upperBound...].first
            if let next, next.isLetter || next == "-" { continue }
            return message + " (the value comes from \(variable))"
        }
        return message
    }
}
