// The `progress-relay` command: parses flags and wires the pieces; the work
// itself lives in RelayServer, RelayAuth and ProgressEmitter.

import ArgumentParser
import Foundation

@main
struct ProgressRelayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "progress-relay",
        abstract: "Relays progress events from a Unix socket to authenticated WebSocket subscribers.",
        subcommands: [ServeCommand.self, EmitCommand.self, TokenCommand.self]
    )

    /// Exit statuses: 0 done, 1 failed at run time, 2 bad flags or configuration.
    static func main() async {
        let arguments = EnvironmentFlags.apply(to: Array(CommandLine.arguments.dropFirst()))
        do {
            var command = try parseAsRoot(arguments)
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let error as CLIError {
            FileHandle.standardError.write(Data("progress-relay: \(error.message)\n".utf8))
            Foundation.exit(error.status)
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Foundation.exit(0)
            }
            let message = fullMessage(for: error)
            FileHandle.standardError.write(Data((message.isEmpty ? "" : message + "\n").utf8))
            Foundation.exit(code == .validationFailure ? 2 : code.rawValue)
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
