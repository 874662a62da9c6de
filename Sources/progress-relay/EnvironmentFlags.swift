// EnvironmentFlags: every flag may also come from `PROGRESS_RELAY_<FLAG>`.
//
// swift-argument-parser reads only the command line, so the environment is
// turned into flags before parsing: a variable is used only when its flag is
// absent from the command line (the command line wins), and a repeatable
// flag's variable holds a comma-separated list.

import Foundation

enum EnvironmentFlags {
    private enum Kind { case single, repeatable, toggle }

    private static let flags: [String: [(name: String, kind: Kind)]] = [
        "serve": [
            ("socket", .single), ("socket-mode", .single), ("listen", .single), ("jwt-secret-file", .single),
            ("jwt-public-key-file", .single), ("grant", .repeatable), ("allow-origin", .repeatable),
            ("history", .single), ("max-event-bytes", .single), ("max-outbound-bytes", .single),
            ("max-inflight-bytes", .single),
            ("ping-interval", .single), ("state-file", .single), ("max-topics", .single),
            ("max-subscriptions", .single), ("topic-ttl", .single), ("log-level", .single), ("dev", .toggle),
        ],
        "emit": [("socket", .single)],
        "token": [("jwt-secret-file", .single)],
    ]

    static func apply(
        to arguments: [String], environment: [String: String] = ProcessInfo.processInfo.environment
    ) -> [String] {
        guard let subcommand = arguments.first, let known = flags[subcommand] else { return arguments }
        var result = arguments
        for (name, kind) in known {
            let given = arguments.contains { $0 == "--" + name || $0.hasPrefix("--" + name + "=") }
            let variable = "PROGRESS_RELAY_" + name.uppercased().replacingOccurrences(of: "-", with: "_")
            guard !given, let value = environment[variable], !value.isEmpty else { continue }
            switch kind {
            case .single:
                result += ["--" + name, value]
            case .repeatable:
                for item in value.split(separator: ",") where !item.trimmingCharacters(in: .whitespaces).isEmpty {
                    result += ["--" + name, item.trimmingCharacters(in: .whitespaces)]
                }
            case .toggle:
                if ["1", "true", "yes", "on"].contains(value.lowercased()) { result.append("--" + name) }
            }
        }
        return result
    }
}
