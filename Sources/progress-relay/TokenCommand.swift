// `progress-relay token`: mints an HS256 token, for scripts and trials.

import ArgumentParser
import Foundation
import RelayAuth
import RelayHub

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

    @Option(help: "The token's aud claim; an empty value leaves aud out.")
    var aud: String = TokenMinter.defaultAudience

    @Option(help: "A kid for the token's header: the relay then verifies it with that key only.")
    var kid: String?

    func run() async throws {
        // A token the relay would always refuse is a mistake to report now, not a string to hand out.
        guard !sub.isEmpty else { throw CLIError.usage("--sub: must not be empty (the relay refuses a token without sub)") }
        for topic in topics where !TopicName.isValidTopicOrPattern(topic) {
            throw CLIError.usage(
                "--topic \(topic): expected a topic (1 to 256 of A-Z a-z 0-9 _ - . : / @ =) or a prefix pattern ending in *")
        }
        guard let seconds = Duration.seconds(parsing: ttl) else {
            throw CLIError.usage("--ttl \(ttl): expected seconds or a number with s, m, h or d")
        }
        if let kid, !KeyFiles.isKeyID(kid) {
            throw CLIError.usage("--kid \(kid): expected 1 to 128 printable ASCII characters without spaces")
        }
        let secret = try SecretFile.read(secretFile, flag: "--jwt-secret-file")
        guard secret.count >= TokenLimits.secretBytes else {
            throw CLIError.usage(
                "--jwt-secret-file \(secretFile): the secret is \(secret.count) bytes, too short: HS256 needs at least 32. "
                    + "Make a good one: (umask 077; head -c 32 /dev/urandom | base64 > \(secretFile))")
        }
        let token = try await TokenMinter.hs256(
            secret: secret, subject: sub, topics: topics, ttl: seconds, audience: aud.isEmpty ? nil : aud, kid: kid)
        print(token)
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
