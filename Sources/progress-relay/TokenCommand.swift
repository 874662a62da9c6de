// `progress-relay token`: mints an HS256 token, for scripts and trials.

import ArgumentParser
import Foundation
import RelayAuth

struct TokenCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "token", abstract: "Print a signed HS256 relay token.")

    @Option(name: .customLong("jwt-secret-file"), help: "File holding the HMAC secret.")
    var secretFile: String

    @Option(help: "The token's subject (user id).")
    var sub: String

    @Option(name: .customLong("topic"), help: "A topic or pattern to grant (repeatable).")
    var topics: [String] = []

    @Option(help: "Lifetime: seconds, or a number with s, m, h or d.")
    var ttl: String = "1h"

    func run() async throws {
        let secret = try SecretFile.read(secretFile, flag: "--jwt-secret-file")
        guard let seconds = Duration.seconds(parsing: ttl) else {
            throw CLIError.usage("--ttl \(ttl): expected seconds or a number with s, m, h or d")
        }
        let token = try await TokenMinter.hs256(secret: secret, subject: sub, topics: topics, ttl: seconds)
        print(token)
    }
}

enum SecretFile {
    /// The file's bytes with one trailing newline removed.
    static func read(_ path: String, flag: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw CLIError.usage("\(flag) \(path): cannot read the file")
        }
        var bytes = [UInt8](data)
        if bytes.last == UInt8(ascii: "\n") { bytes.removeLast() }
        if bytes.last == UInt8(ascii: "\r") { bytes.removeLast() }
        guard !bytes.isEmpty else { throw CLIError.usage("\(flag) \(path): the file is empty") }
        return bytes
    }
}

extension Duration {
    /// Seconds in `text` (`90`, `30s`, `15m`, `1h`, `7d`), or nil.
    static func seconds(parsing text: String) -> Double? {
        let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
        var number = Substring(text)
        var factor = 1.0
        if let last = text.last, let unit = units[last] {
            factor = unit
            number = number.dropLast()
        }
        guard let value = Double(number), value > 0, value.isFinite else { return nil }
        return value * factor
    }
}
