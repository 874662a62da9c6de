// TokenMinter: HS256 tokens for `progress-relay token` and `--dev`.

import Foundation
import JWTKit

public enum TokenMinter {
    /// The audience `progress-relay token` writes unless told otherwise; the README recommends
    /// `--jwt-audience progress-relay`, so that a token minted for another service is refused.
    public static let defaultAudience = "progress-relay"

    /// A signed HS256 token for `subject`, granting `topics`, valid for `ttl` seconds from `now`,
    /// with `iat`, and `aud` unless `audience` is nil; `kid` in the header when given. The secret
    /// must be at least 32 bytes (RFC 7518 §3.2): the relay refuses a shorter one.
    public static func hs256(
        secret: [UInt8], subject: String, topics: [String], ttl: TimeInterval, now: Date = Date(),
        audience: String? = defaultAudience, kid: String? = nil
    ) async throws -> String {
        guard !secret.isEmpty else { throw KeyError.emptySecret }
        guard secret.count >= TokenLimits.secretBytes else { throw KeyError.shortSecret(secret.count) }
        let keys = await JWTKeyCollection().add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
        let issued = now.timeIntervalSince1970.rounded(.down)
        let claims = RelayClaims(
            sub: subject, exp: issued + ttl.rounded(.down), nbf: nil, iat: issued,
            aud: audience.map { RelayAudience([$0]) }, topics: topics)
        return try await keys.sign(claims, kid: kid.map { JWKIdentifier(string: $0) })
    }
}
