// The `progress-relay` command: parses flags and wires the pieces; the work
// itself lives in RelayServer, RelayAuth and ProgressEmitter.

import ArgumentParser
import Foundation

@main
struct ProgressRelayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "progress-relay",
        abstract: "Relays progress events from a Unix socket to authenticated WebSocket subscribers.",
        subcommands: [ServeCommand.self, EmitCommand.self, TokenCommand.self, WatchCommand.self]
    )

    /// Exit statuses: 0 done, 1 failed at run time, 2 bad flags or configuration. Every error is
    /// one line on standard error.
    static func main() async {
        let (arguments, variables) = EnvironmentFlags.apply(to: Array(CommandLine.arguments.dropFirst()))
        func fail(_ message: String, status: Int32) -> Never {
            let line = EnvironmentFlags.attribute(message, variables: variables)
            FileHandle.standardError.write(Data("progress-relay: \(line)\n".utf8))
            Foundation.exit(status)
        }
        do {
            var command = try parseAsRoot(arguments)
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let error as CLIError {
            fail(error.message, status: error.status)
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Foundation.exit(0)
            }
            // The parser's own message, without its usage block: one line, like every other error.
            let lines = message(for: error).split(whereSeparator: \.isNewline)
                .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            let subcommand = arguments.first.map { ["serve", "emit", "token", "watch"].contains($0) ? " \($0)" : "" } ?? ""
            fail(
                (lines.isEmpty ? "invalid arguments" : lines.joined(separator: " "))
                    + " (see progress-relay\(subcommand) --help)",
                status: code == .validationFailure ? 2 : code.rawValue)
        }
    }
}

/// A failure the user should read: one line, and the exit status that goes with it.
struct CLIError: Error {
    let message: String
    let status: Int32

    /// Bad flags or configuration (exit status 2).
    static func usage(_ message: String) -> CLIError { CLIError(message: message, status: 2) }
    /// Something failed while running (exit status 1).
    static func failure(_ message: String) -> CLIError { CLIError(message: message, status: 1) }
}
