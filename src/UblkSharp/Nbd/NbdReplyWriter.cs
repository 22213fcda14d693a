using System.Buffers;
using System.Net.Sockets;

using UblkSharp.Nbd.Protocol;

namespace UblkSharp.Nbd;

/// <summary>
/// Serializes one connection's replies from any thread. Small replies are copied into a pending
/// buffer; whichever thread finds no send in progress becomes the sender and drains it (while it
/// sends, others keep appending to a second buffer), so replies that complete together leave in
/// one send. The connection's reader may <see cref="Cork"/> the writer while it works through a
/// batch of requests it already holds, and <see cref="Uncork"/> it before it blocks. Large
/// payloads go straight from their buffer, right after their header.
/// </summary>
internal sealed class NbdReplyWriter : IDisposable
{
    private const int Capacity = 128 * 1024;

    // A cork holds replies back only up to this much: past it they go, so the client can work on
    // them while the rest of the batch is done (measured with fio: better than holding the whole batch).
    private const int CorkLimit = 32 * 1024;

    /// <summary>Payloads at least this long are sent from their own buffer rather than copied.</summary>
    public const int DirectThreshold = 32 * 1024;

    private readonly NbdTransport _socket;
    private readonly object _lock = new();
    private byte[] _pending;
    private byte[] _spare;
    private int _pendingLength;
    private bool _sending;
    private bool _corked;
    private volatile bool _failed;

    public NbdReplyWriter(Socket socket)
        : this(new NbdTransport(socket))
    {
    }

    public NbdReplyWriter(NbdTransport socket)
    {
        _socket = socket;
        _pending = ArrayPool<byte>.Shared.Rent(Capacity);
        _spare = ArrayPool<byte>.Shared.Rent(Capacity);
    }

    /// <summary>A send failed: the peer is gone. Later replies are dropped.</summary>
    public bool Failed => _failed;

    /// <summary>Queues a reply (header, then payload). Returns false if the connection has failed.</summary>
    public bool Send(ReadOnlySpan<byte> header, ReadOnlySpan<byte> payload)
    {
        if (payload.Length >= DirectThreshold)
        {
            return SendDirect(header, payload);
        }
        var total = header.Length + payload.Length;
        lock (_lock)
        {
            while (!_failed && _pendingLength > 0 && _pendingLength + total > _pending.Length)
            {
                if (_sending)
                {
                    Monitor.Wait(_lock);
                }
                else
                {
                    // Full, and corked or idle: drain it here.
                    _sending = true;
                    DrainLocked();
                    _sending = false;
                    Monitor.PulseAll(_lock);
                }
            }
            if (_failed)
            {
                return false;
            }
            Append(header, payload);
            if (_sending || (_corked && _pendingLength < CorkLimit))
            {
                return true; // the sender (or the uncork) takes it
            }
            _sending = true;
            DrainLocked();
            _sending = false;
            Monitor.PulseAll(_lock);
            return !_failed;
        }
    }

    private bool SendDirect(ReadOnlySpan<byte> header, ReadOnlySpan<byte> payload)
    {
        lock (_lock)
        {
            while (_sending && !_failed)
            {
                Monitor.Wait(_lock);
            }
            if (_failed)
            {
                return false;
            }
            _sending = true;
            try
            {
                if (_pendingLength + header.Length > _pending.Length)
                {
                    DrainLocked();
                }
                Append(header, ReadOnlySpan<byte>.Empty);
                // One batch only, ending with our header: replies appended while it is being sent
                // must not come between the header and its payload.
                DrainLocked(once: true);
                if (!_failed)
                {
                    // Nobody else sends while we own the socket, so the payload follows its header.
                    Monitor.Exit(_lock);
                    try
                    {
                        _socket.SendAll(payload);
                    }
                    catch (Exception e) when (SocketIo.IsConnectionError(e))
                    {
                        _failed = true;
                    }
                    finally
                    {
                        Monitor.Enter(_lock);
                    }
                }
                DrainLocked();
            }
            finally
            {
                _sending = false;
                Monitor.PulseAll(_lock);
            }
            return !_failed;
        }
    }

    /// <summary>Holds replies back until <see cref="Uncork"/>, or until 32 KiB of them are waiting.</summary>
    public void Cork()
    {
        lock (_lock)
        {
            _corked = true;
        }
    }

    /// <summary>Sends what is pending unless a send is already under way (which then takes it).</summary>
    public void Uncork()
    {
        lock (_lock)
        {
            _corked = false;
            if (_sending || _pendingLength == 0 || _failed)
            {
                return;
            }
            _sending = true;
            DrainLocked();
            _sending = false;
            Monitor.PulseAll(_lock);
        }
    }

    private void Append(ReadOnlySpan<byte> header, ReadOnlySpan<byte> payload)
    {
        if (_pendingLength + header.Length + payload.Length > _pending.Length)
        {
            // Only an empty buffer gets here with a reply larger than it (a big BLOCK_STATUS): grow.
            var bigger = ArrayPool<byte>.Shared.Rent(_pendingLength + header.Length + payload.Length);
            _pending.AsSpan(0, _pendingLength).CopyTo(bigger);
            ArrayPool<byte>.Shared.Return(_pending);
            _pending = bigger;
        }
        header.CopyTo(_pending.AsSpan(_pendingLength));
        _pendingLength += header.Length;
        payload.CopyTo(_pending.AsSpan(_pendingLength));
        _pendingLength += payload.Length;
    }

    // Called holding _lock with _sending set: sends until nothing is pending (or one batch), releasing
    // the lock during each send so other threads can append to the other buffer.
    private void DrainLocked(bool once = false)
    {
        while (_pendingLength > 0 && !_failed)
        {
            var buffer = _pending;
            var length = _pendingLength;
            (_pending, _spare) = (_spare, _pending);
            _pendingLength = 0;
            Monitor.PulseAll(_lock);
            Monitor.Exit(_lock);
            try
            {
                _socket.SendAll(buffer.AsSpan(0, length));
            }
            catch (Exception e) when (SocketIo.IsConnectionError(e))
            {
                _failed = true;
            }
            finally
            {
                Monitor.Enter(_lock);
            }
            if (once)
            {
                break;
            }
        }
        if (_failed)
        {
            _pendingLength = 0;
        }
    }

    public void Dispose()
    {
        lock (_lock)
        {
            _failed = true;
            while (_sending)
            {
                Monitor.Wait(_lock);
            }
            ArrayPool<byte>.Shared.Return(_pending);
            ArrayPool<byte>.Shared.Return(_spare);
            _pending = [];
            _spare = [];
            _pendingLength = 0;
        }
    }
}
