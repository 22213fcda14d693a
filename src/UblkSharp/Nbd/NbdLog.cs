using Microsoft.Extensions.Logging;

namespace UblkSharp.Nbd;

/// <summary>
/// What the NBD server logs. Events a client can cause in bulk go through a <see cref="LogThrottle"/>
/// first; {More} is its " (N more since the last message)". A message that carries an exception
/// leaves its text out: the provider decides how much of it to show.
/// </summary>
internal static partial class NbdLog
{
    [LoggerMessage(EventId = 200, Level = LogLevel.Warning, Message = "nbd: accept failed: {Reason}")]
    public static partial void AcceptFailed(ILogger logger, string reason);

    [LoggerMessage(EventId = 201, Level = LogLevel.Warning, Message = "nbd: connection refused: {Max} connections are open, all past their handshake (the most allowed: --max-connections){More}")]
    public static partial void ConnectionRefused(ILogger logger, int max, string more);

    [LoggerMessage(EventId = 202, Level = LogLevel.Warning, Message = "nbd: {Max} connections are open: closed the oldest one still in its handshake to let a new client in{More}")]
    public static partial void HandshakeEvicted(ILogger logger, int max, string more);

    [LoggerMessage(EventId = 203, Level = LogLevel.Warning, Message = "nbd: client cut off: no handshake within {Seconds} s{More}")]
    public static partial void HandshakeTimedOut(ILogger logger, double seconds, string more);

    [LoggerMessage(EventId = 204, Level = LogLevel.Information, Message = "nbd: closed a connection idle for {Seconds} s (--idle-timeout){More}")]
    public static partial void IdleClosed(ILogger logger, double seconds, string more);

    [LoggerMessage(EventId = 205, Level = LogLevel.Warning, Message = "nbd: closing a target failed")]
    public static partial void CloseTargetFailed(ILogger logger, Exception exception);

    [LoggerMessage(EventId = 206, Level = LogLevel.Warning, Message = "nbd: client cut off: {What}")]
    public static partial void ProtocolError(ILogger logger, string what);

    [LoggerMessage(EventId = 207, Level = LogLevel.Error, Message = "nbd: target threw on {Command} at {Offset}{More}")]
    public static partial void TargetThrew(ILogger logger, string command, long offset, string more, Exception exception);

    [LoggerMessage(EventId = 208, Level = LogLevel.Error, Message = "nbd: internal error, connection closed")]
    public static partial void InternalError(ILogger logger, Exception exception);

    [LoggerMessage(EventId = 209, Level = LogLevel.Warning, Message = "nbd: {Left} connection(s) still busy in their target after {Seconds} s; their targets stay open until they finish")]
    public static partial void StillBusy(ILogger logger, int left, double seconds);

    [LoggerMessage(EventId = 210, Level = LogLevel.Warning, Message = "nbd: TLS handshake failed, client cut off: {Reason}{More}")]
    public static partial void TlsFailed(ILogger logger, string reason, string more);

    [LoggerMessage(EventId = 211, Level = LogLevel.Warning, Message = "nbd: refused {Option} before STARTTLS: TLS is required (--tls require){More}")]
    public static partial void TlsRequired(ILogger logger, string option, string more);

    [LoggerMessage(EventId = 212, Level = LogLevel.Debug, Message = "nbd: TLS started: {Session}")]
    public static partial void TlsStarted(ILogger logger, string session);

    [LoggerMessage(EventId = 213, Level = LogLevel.Information, Message = "nbd: TLS-PSK client '{User}' authenticated: {Session}")]
    public static partial void TlsPskStarted(ILogger logger, string user, string session);
}
