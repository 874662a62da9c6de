// `progress-relay watch`: live progress bars (or lines, or JSON) for topics, from the terminal.

import ArgumentParser
import Dispatch
import Foundation
import RelayHub
import RelayServer
import RelayWatch

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

struct WatchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "watch",
        abstract: "Show live progress of topics: bars on a terminal, one line per event in a pipe.",
        discussion: """
            Exit status: 0 when every exact topic sent complete; 1 when all ended and one failed \
            (error, or complete with success false); 2 when the relay refuses the token or a topic; \
            130 on Ctrl-C. With patterns only, it runs until interrupted.
            """)

    @Option(help: "The relay's HTTP address.")
    var url = "http://" + ServeCommand.defaultListen

    @Option(name: .customLong("token-file"), help: "File holding the token (JWT).")
    var tokenFile: String?

    @Option(help: "The token (JWT); prefer --token-file or $PROGRESS_RELAY_TOKEN, which stay out of ps.")
    var token: String?

    @Flag(help: "Print each frame as received, one JSON object per line.")
    var json = false

    @Flag(help: "One line per event even on a terminal.")
    var plain = false

    @Argument(help: "Topics, or patterns ending in * (one bar per matching topic as it appears).")
    var topics: [String]

    func validate() throws {
        guard !topics.isEmpty else { throw ValidationError("name at least one topic") }
        for topic in topics where !TopicName.isValidTopicOrPattern(topic) {
            throw ValidationError(
                "\(topic): expected a topic (1 to 256 of A-Z a-z 0-9 _ - . : / @ =) or a prefix pattern ending in *")
        }
        if json && plain { throw ValidationError("--json and --plain exclude each other") }
    }

    func run() async throws {
        let endpoint: RelayEndpoint
        do { endpoint = try RelayEndpoint(url: url) } catch { throw CLIError.usage(error.message) }
        let jwt = try resolveToken()
        let mode: OutputMode = json ? .json : (plain || isatty(STDOUT_FILENO) == 0 ? .plain : .bars)

        let watcher = Watcher(
            endpoint: endpoint, token: jwt, topics: topics, mode: mode,
            write: { writeAll(STDOUT_FILENO, $0) },
            note: { writeAll(STDERR_FILENO, "progress-relay: \($0)\n") })

        // Ctrl-C ends cleanly: the last frame drawn, the cursor back, status 130.
        let signals = [SIGINT, SIGTERM, SIGWINCH].map { number -> DispatchSourceSignal in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler {
                if number == SIGWINCH {
                    let (width, height) = terminalSize()
                    watcher.resize(width: width, height: height)
                    return
                }
                watcher.finishDisplay()
                if mode == .bars { writeAll(STDOUT_FILENO, "") }
                Foundation.exit(number == SIGINT ? 130 : 143)
            }
            source.resume()
            return source
        }
        defer { signals.forEach { $0.cancel() } }

        var ticker: Task<Void, Never>?
        if mode == .bars {
            let (width, height) = terminalSize()
            watcher.resize(width: width, height: height)
            ticker = Task {
                while !Task.isCancelled {
                    watcher.tick()
                    try? await Task.sleep(for: .milliseconds(100))
                }
            }
        }
        let end = await watcher.run()
        ticker?.cancel()
        watcher.finishDisplay()
        switch end {
        case .done(let status):
            if status != 0 {
                let failed = watcher.failedTopics()
                writeAll(STDERR_FILENO, "progress-relay: \(failed.joined(separator: ", ")) ended with an error\n")
            }
            Foundation.exit(status)
        case .refused(let message):
            throw CLIError(message: message, status: 2)
        }
    }

    /// `--token-file`, else `--token`. When both are set, the one from the command line wins over
    /// the one from the environment (both from one place is a mistake to report).
    private func resolveToken() throws -> String {
        let environment = ProcessInfo.processInfo.environment
        var useFile = tokenFile != nil
        if let tokenFile, let token {
            let fileFromEnvironment = environment["PROGRESS_RELAY_TOKEN_FILE"] == tokenFile
            let tokenFromEnvironment = environment["PROGRESS_RELAY_TOKEN"] == token
            guard fileFromEnvironment != tokenFromEnvironment else {
                throw CLIError.usage("give --token-file or --token, not both")
            }
            useFile = tokenFromEnvironment
        }
        let value: String
        if useFile, let tokenFile {
            do {
                value = try String(contentsOfFile: tokenFile, encoding: .utf8)
            } catch {
                throw CLIError.usage("--token-file \(tokenFile): cannot read it (\(error.localizedDescription))")
            }
        } else if let token {
            value = token
        } else {
            throw CLIError.usage("no token: give --token-file, --token or PROGRESS_RELAY_TOKEN")
        }
        let jwt = value.trimmingCharacters(in: .whitespacesAndNewlines)
        let allowed = Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
        guard !jwt.isEmpty, jwt.allSatisfy(allowed.contains) else {
            throw CLIError.usage("\(useFile ? "--token-file" : "--token"): not a compact JWT (base64url parts joined by dots)")
        }
        return jwt
    }
}

/// Columns and rows of the terminal on standard output; 80×24 when it will not say.
private func terminalSize() -> (Int, Int) {
    var size = winsize()
    if ioctl(STDOUT_FILENO, UInt(TIOCGWINSZ), &size) == 0, size.ws_col > 0 {
        return (Int(size.ws_col), Int(max(size.ws_row, 3)))
    }
    return (80, 24)
}

/// The whole text, across short writes; a closed pipe ends the watch as it would end `cat`.
private func writeAll(_ fd: Int32, _ text: String) {
    do {
        try SystemCalls.writeAll(fd, Array(text.utf8))
    } catch {
        if error.code == EPIPE { Foundation.exit(fd == STDOUT_FILENO ? 141 : 1) }
    }
}
