using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace UblkSharp.Nbd;

/// <summary>Where a connection runs a request's target call.</summary>
public enum NbdExecution
{
    /// <summary>
    /// On the connection's own thread while the target answers fast (memory, page cache), which
    /// lets one receive and one send carry a whole batch of requests; on the worker threads once
    /// calls take longer, so slow requests run in parallel and reply out of order.
    /// FLUSH and FUA requests always go to the workers.
    /// </summary>
    Auto,

    /// <summary>Always on the connection's thread: requests complete in order, one at a time.</summary>
    Inline,

    /// <summary>Always on the worker threads: requests run in parallel and may complete out of order.</summary>
    Workers,
}

/// <summary>Limits and behaviour of an <see cref="NbdServer"/>.</summary>
public sealed record NbdServerOptions
{
    /// <summary>
    /// Connections served at once. When that many are open, a new one takes the place of the
    /// oldest still in its handshake; if every one has finished its handshake, the new one is
    /// closed at once.
    /// </summary>
    public int MaxConnections { get; init; } = 1024;

    /// <summary>Requests one connection may have in flight; the connection stops reading beyond that.</summary>
    public int MaxInFlight { get; init; } = 64;

    /// <summary>READ/WRITE payload bytes one connection may have in flight (a single request may exceed it).</summary>
    public long MaxInFlightBytes { get; init; } = 64L << 20;

    /// <summary>Worker threads shared by all connections for target calls that may block.</summary>
    public int Workers { get; init; } = 16;

    /// <summary>
    /// A client that has not finished the handshake this long after it connected is disconnected,
    /// however steadily it trickles bytes in.
    /// </summary>
    public TimeSpan HandshakeTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>
    /// A connection in the transmission phase that has sent no request for this long, and has none
    /// in flight, is closed; zero (the default) never closes one. Off by default because the Linux
    /// nbd driver keeps its connections open, silent, while nothing uses the device, and does not
    /// reconnect by itself.
    /// </summary>
    public TimeSpan IdleTimeout { get; init; } = TimeSpan.Zero;

    public NbdExecution Execution { get; init; } = NbdExecution.Auto;

    /// <summary>
    /// Target calls slower than this on average (per connection, not counting the time to copy
    /// their payload) move to the workers (Auto).
    /// </summary>
    public TimeSpan InlineThreshold { get; init; } = TimeSpan.FromMicroseconds(30);

    /// <summary>
    /// How long <see cref="NbdServer.Dispose"/> waits for connections to finish what they have in
    /// flight. A target call still running after that keeps its target open (see
    /// <see cref="NbdServer.ReleaseWhenIdle"/>): a target is never closed under a live call.
    /// </summary>
    public TimeSpan StopTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// Where to report connection problems, failing targets and internal errors; by default
    /// nowhere. What a client can cause in bulk is logged at most once per 10 s per kind.
    /// </summary>
    public ILoggerFactory LoggerFactory { get; init; } = NullLoggerFactory.Instance;

    /// <summary>TLS (NBD_OPT_STARTTLS) with these credentials; null (the default): no TLS.</summary>
    public NbdTlsOptions? Tls { get; init; }

    public void Validate()
    {
        ArgumentNullException.ThrowIfNull(LoggerFactory);
        if (MaxConnections < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(MaxConnections), "MaxConnections must be at least 1");
        }
        if (MaxInFlight is < 1 or > 4096)
        {
            throw new ArgumentOutOfRangeException(nameof(MaxInFlight), "MaxInFlight must be 1 to 4096");
        }
        if (MaxInFlightBytes < 1 << 20)
        {
            throw new ArgumentOutOfRangeException(nameof(MaxInFlightBytes), "MaxInFlightBytes must be at least 1 MiB");
        }
        if (Workers is < 1 or > 1024)
        {
            throw new ArgumentOutOfRangeException(nameof(Workers), "Workers must be 1 to 1024");
        }
        if (StopTimeout < TimeSpan.Zero)
        {
            throw new ArgumentOutOfRangeException(nameof(StopTimeout), "StopTimeout must not be negative");
        }
        if (HandshakeTimeout <= TimeSpan.Zero)
        {
            throw new ArgumentOutOfRangeException(nameof(HandshakeTimeout), "HandshakeTimeout must be positive");
        }
        if (IdleTimeout < TimeSpan.Zero)
        {
            throw new ArgumentOutOfRangeException(nameof(IdleTimeout), "IdleTimeout must not be negative (0 turns it off)");
        }
        if (Tls is { Mode: not NbdTlsMode.Off })
        {
            Tls.Validate();
        }
    }
}
