using System.Buffers;
using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using UblkSharp.Interop;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Runtime.Metrics;
using UblkSharp.Targets;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Nbd;

/// <summary>
/// One client connection: the handshake, then the transmission phase. The connection's thread
/// reads requests, validates each one centrally (every refusal is the error the protocol asks
/// for), and runs it inline or on the server's workers (<see cref="NbdExecution"/>); replies go
/// through an <see cref="NbdReplyWriter"/> and may leave out of order. In-flight requests are
/// bounded in number and bytes; when the client goes away, what is in flight finishes first.
/// Every request answered is counted (<see cref="QueueStats"/>): the connection's thread writes
/// its own figures with plain increments, the workers theirs with atomic ones.
/// </summary>
internal sealed class NbdConnection : IDisposable
{
    // Big enough for a batch of 4k requests, or a 128k write and the requests around it.
    private const int InputSize = 256 * 1024;
    // A refused WRITE's payload is read and dropped up to this size; beyond it the client is cut off.
    private const uint SkipLimit = 2u * NbdExport.MaxPayload;
    private const int MaxDescriptors = 1024;
    private const uint BaseAllocationId = 1;
    private const int InlineMaxLength = 1 << 20;
    // Replies of requests run inline go out once this much payload has been handled since the
    // last send, rather than at the end of the batch: the client gets to work on them sooner.
    private const int InlineFlushBytes = 32 * 1024;

    private readonly NbdServer _server;
    private readonly Socket _socket;
    private readonly NbdTransport _transport;
    private readonly Thread _thread;
    private readonly NbdServerOptions _options;
    private readonly long _inlineThresholdTicks;
    private readonly object _gate = new();
    private readonly NbdRequest[] _free;
    private int _freeCount;
    private int _inFlight;
    private long _inFlightBytes;
    private bool _readerWaiting;

    private NbdSession? _session;
    private NbdExport _export = null!;
    private BlockTarget _target = null!;
    private NbdReplyWriter? _writer;
    private ResultFilter? _filter;
    private byte[] _in = [];
    private int _start;
    private int _end;
    private long _ewmaTicks;
    private long _inlineSinceFlush;
    private volatile bool _closing;
    private volatile bool _transmitting;
    private long _lastRequest;
    private int _reaped;
    private readonly int _threadId;
    // Made as the transmission phase starts: a handshake (or a flood of them) costs no figures.
    private QueueStats? _stats;
    private QueueStats? _workerStats;
    private volatile NbdExport? _statsExport;

    public NbdConnection(NbdServer server, Socket socket, long id)
    {
        _server = server;
        _socket = socket;
        _transport = new NbdTransport(socket);
        _options = server.Options;
        Id = id;
        _inlineThresholdTicks = (long)(_options.InlineThreshold.TotalSeconds * Stopwatch.Frequency);
        _free = new NbdRequest[_options.MaxInFlight];
        _thread = new Thread(Run, 256 * 1024) { IsBackground = true, Name = $"nbd-conn{id}" };
        _threadId = _thread.ManagedThreadId;
    }

    public long Id { get; }

    /// <summary>Who is at the other end: a TCP address and port, or a unix socket client's pid.</summary>
    public string Peer { get; private set; } = "";

    /// <summary>The export this connection serves, once past its handshake; null before.</summary>
    public NbdExport? StatsExport => _statsExport;

    /// <summary>When the client connected (<see cref="Environment.TickCount64"/>): the handshake's deadline counts from it.</summary>
    public long AcceptedAt { get; } = Environment.TickCount64;

    /// <summary>Still in the handshake (not yet in the transmission phase).</summary>
    public bool InHandshake => !_transmitting;

    /// <summary>Taken by a newer connection (the server's lock guards it): it no longer counts against MaxConnections.</summary>
    public bool Evicted { get; set; }

    /// <summary>In the transmission phase with no request in flight and none received for <paramref name="idleMs"/>.</summary>
    public bool IsIdle(long now, long idleMs)
        => _transmitting && Volatile.Read(ref _inFlight) == 0 && now - Volatile.Read(ref _lastRequest) >= idleMs;

    /// <summary>True the first time only: the server's reaper closes a connection once.</summary>
    public bool ClaimReap() => Interlocked.Exchange(ref _reaped, 1) == 0;

    /// <summary>
    /// Ends a connection that has nothing in flight (a handshake): both directions are shut, so a
    /// thread blocked sending to a client that does not read wakes up too.
    /// </summary>
    public void Abort()
    {
        _closing = true;
        try
        {
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (SocketIo.IsConnectionError(e))
        {
        }
    }

    public void Start() => _thread.Start();

    public bool Join(TimeSpan timeout) => _thread.Join(timeout);

    /// <summary>
    /// Ends the connection gracefully: the reader sees the end of the stream, requests in flight
    /// finish and reply, then the socket closes.
    /// </summary>
    public void Shutdown()
    {
        _closing = true;
        try
        {
            _socket.Shutdown(SocketShutdown.Receive);
        }
        catch (Exception e) when (SocketIo.IsConnectionError(e))
        {
        }
    }

    private void Run()
    {
        try
        {
            Peer = PeerOf(_socket);
            _socket.ReceiveTimeout = (int)Math.Min(int.MaxValue, _options.HandshakeTimeout.TotalMilliseconds);
            _session = NbdHandshake.Negotiate(_transport, _server, EnterTransmission);
            if (_session is null || _closing)
            {
                return;
            }
            _socket.ReceiveTimeout = 0;
            Transmit(_session);
        }
        catch (Exception e) when (SocketIo.IsConnectionError(e))
        {
            // The client went away, timed out, or broke off in the middle of a message.
        }
        catch (Exception e)
        {
            _server.NoteInternalError(e);
        }
        finally
        {
            Close();
        }
    }

    private void EnterTransmission()
    {
        Volatile.Write(ref _lastRequest, Environment.TickCount64);
        _transmitting = true;
    }

    private void Close()
    {
        try
        {
            WaitIdle();
            _writer?.Uncork();
        }
        catch (Exception e)
        {
            _server.NoteInternalError(e);
        }
        Dispose();
        try
        {
            _transport.Dispose();
        }
        catch (Exception e) when (SocketIo.IsConnectionError(e))
        {
        }
        try
        {
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (SocketIo.IsConnectionError(e))
        {
        }
        _socket.Dispose();
        if (_in.Length > 0)
        {
            ArrayPool<byte>.Shared.Return(_in);
            _in = [];
        }
        lock (_gate)
        {
            for (var i = 0; i < _freeCount; i++)
            {
                _free[i].ReleaseOwned();
            }
        }
        _server.Remove(this);
    }

    /// <summary>Releases the reply writer's buffers (the connection's thread does this as it ends).</summary>
    public void Dispose() => _writer?.Dispose();

    private void Transmit(NbdSession session)
    {
        _export = session.Export;
        _target = _export.Target;
        _filter = _target.CreateResultFilter((int)(Id & 0x7fffffff));
        _in = ArrayPool<byte>.Shared.Rent(InputSize);
        _writer = new NbdReplyWriter(_transport);
        _stats = new QueueStats();
        _statsExport = _export; // publishes _stats and Peer to the readers of the figures
        while (!_closing && !_writer.Failed)
        {
            if (!Fill(RequestSize))
            {
                return;
            }
            // A request's latency counts from here (its header read) to its reply.
            var started = Stopwatch.GetTimestamp();
            var h = new ReadOnlySpan<byte>(_in, _start, RequestSize);
            var magic = BinaryPrimitives.ReadUInt32BigEndian(h);
            var flags = BinaryPrimitives.ReadUInt16BigEndian(h[4..]);
            var type = BinaryPrimitives.ReadUInt16BigEndian(h[6..]);
            var cookie = BinaryPrimitives.ReadUInt64BigEndian(h[8..]);
            var offset = BinaryPrimitives.ReadUInt64BigEndian(h[16..]);
            var length = BinaryPrimitives.ReadUInt32BigEndian(h[24..]);
            _start += RequestSize;
            Volatile.Write(ref _lastRequest, Environment.TickCount64);
            if (magic != RequestMagic)
            {
                // Nothing after a bad header can be trusted to be a header: hard disconnect.
                _server.NoteProtocolError($"bad request magic 0x{magic:x8}");
                return;
            }
            if (type == CmdDisc)
            {
                return; // in-flight requests finish in Close
            }
            var error = Validate(session, type, flags, offset, length, out var why);
            if (error != 0)
            {
                _server.NoteRefused();
                if (type == CmdWrite && (length > SkipLimit || !Skip(length)))
                {
                    return;
                }
                Record(type, -(int)error, started); // NBD's error numbers are Linux errnos; counted before the reply, as below
                ReplyError(cookie, error, why);
                continue;
            }
            var bytes = type is CmdRead or CmdWrite ? length : 0;
            var request = Acquire(bytes);
            request.Cookie = cookie;
            request.Type = type;
            request.Flags = flags;
            request.Offset = (long)offset;
            request.Length = length;
            request.Started = started;
            var inline = ShouldInline(request);
            if (type == CmdWrite && inline && length <= _in.Length / 2)
            {
                // Run the write from the input buffer itself: no copy, and the payload usually came
                // in with the requests around it.
                bool complete;
                try
                {
                    complete = Fill((int)length);
                }
                catch
                {
                    Release(request);
                    throw;
                }
                if (!complete)
                {
                    Release(request);
                    return;
                }
                var payload = new ReadOnlySpan<byte>(_in, _start, (int)length);
                _start += (int)length;
                Execute(request, payload);
                FlushAfterInline(length);
                continue;
            }
            if (bytes > 0)
            {
                request.TakeBuffer((int)length);
            }
            if (type == CmdWrite)
            {
                bool complete;
                try
                {
                    complete = ReceivePayload(request.Buffer!, (int)length);
                }
                catch
                {
                    Release(request);
                    throw;
                }
                if (!complete)
                {
                    // The client left in the middle of a write it was never told had been done.
                    Release(request);
                    return;
                }
            }
            if (inline)
            {
                Execute(request);
                FlushAfterInline(length);
            }
            else if (!_server.Workers.TryEnqueue(request))
            {
                // The server is stopping and its workers are gone: run it here rather than lose it.
                Execute(request);
            }
        }
    }

    private void FlushAfterInline(uint length)
    {
        _inlineSinceFlush += Math.Max(length, 512);
        if (_inlineSinceFlush >= InlineFlushBytes)
        {
            _inlineSinceFlush = 0;
            _writer!.Uncork();
            _writer.Cork();
        }
    }

    private bool ShouldInline(NbdRequest request) => _options.Execution switch
    {
        NbdExecution.Inline => true,
        NbdExecution.Workers => false,
        _ => request.Type != CmdFlush && (request.Flags & CmdFlagFua) == 0 && request.Length <= InlineMaxLength
            && Volatile.Read(ref _ewmaTicks) < _inlineThresholdTicks,
    };

    /// <summary>The protocol's checks, in one place; returns 0 or the NBD error to reply with.</summary>
    private static uint Validate(NbdSession session, ushort type, ushort flags, ulong offset, uint length, out string why)
    {
        why = "";
        var export = session.Export;
        if (type is not (CmdRead or CmdWrite or CmdFlush or CmdTrim or CmdCache or CmdWriteZeroes or CmdBlockStatus))
        {
            why = $"unknown command {type}";
            return EINVAL;
        }
        if ((flags & ~CmdFlagsKnown) != 0)
        {
            why = $"unknown command flags 0x{flags:x}";
            return EINVAL;
        }
        if ((flags & (CmdFlagNoHole | CmdFlagFastZero)) != 0 && type != CmdWriteZeroes)
        {
            why = "NO_HOLE and FAST_ZERO apply to WRITE_ZEROES only";
            return EINVAL;
        }
        if ((flags & CmdFlagDf) != 0 && (type != CmdRead || !session.StructuredReplies))
        {
            why = "DF applies to READ with structured replies only";
            return EINVAL;
        }
        if ((flags & CmdFlagReqOne) != 0 && type != CmdBlockStatus)
        {
            why = "REQ_ONE applies to BLOCK_STATUS only";
            return EINVAL;
        }
        if ((flags & CmdFlagFua) != 0 && (session.Flags & FlagSendFua) == 0)
        {
            why = "FUA was not offered on this export";
            return EINVAL;
        }
        if (export.IsReadOnly && type is CmdWrite or CmdTrim or CmdWriteZeroes)
        {
            why = "the export is read-only";
            return EPERM;
        }
        switch (type)
        {
            case CmdFlush:
                if ((session.Flags & FlagSendFlush) == 0)
                {
                    why = "FLUSH was not offered on this export";
                    return EINVAL;
                }
                if (offset != 0 || length != 0)
                {
                    why = "FLUSH takes offset 0 and length 0";
                    return EINVAL;
                }
                return 0;
            case CmdTrim when !export.CanTrim:
                why = "TRIM was not offered on this export";
                return EINVAL;
            case CmdWriteZeroes when !export.CanWriteZeroes:
                why = "WRITE_ZEROES was not offered on this export";
                return EINVAL;
            case CmdBlockStatus when !session.BaseAllocation:
                why = "BLOCK_STATUS needs the base:allocation context (NBD_OPT_SET_META_CONTEXT)";
                return EINVAL;
            default:
                break;
        }
        if (length == 0)
        {
            why = "zero-length request";
            return EINVAL;
        }
        if (type is CmdRead or CmdWrite && length > NbdExport.MaxPayload)
        {
            why = $"{CommandName(type)} of {length} bytes is larger than the maximum payload ({NbdExport.MaxPayload} bytes)";
            return (flags & CmdFlagDf) != 0 ? EOVERFLOW : EINVAL;
        }
        var size = (ulong)export.Size;
        if (offset > size || length > size - offset)
        {
            why = $"{CommandName(type)} of {length} bytes at {offset} runs past the end of the export ({size} bytes)";
            return type is CmdWrite or CmdWriteZeroes ? ENOSPC : EINVAL;
        }
        return 0;
    }

    /// <summary>Runs one request's target call and replies. Called inline or on a worker.</summary>
    internal void Execute(NbdRequest request) => Execute(request, request.Type == CmdWrite ? request.Buffer.AsSpan(0, (int)request.Length) : default);

    private void Execute(NbdRequest request, ReadOnlySpan<byte> writeData)
    {
        var started = Stopwatch.GetTimestamp();
        int result;
        var payload = 0;
        try
        {
            if (_filter is not null)
            {
                TimeSpan delay;
                lock (_filter)
                {
                    delay = _filter.DrawDelay();
                }
                if (delay > TimeSpan.Zero)
                {
                    Thread.Sleep(delay);
                }
            }
            result = Run(request, writeData, out payload);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // A target's bug fails one request, not the connection.
            _server.NoteTargetException(request, e);
            result = -Errno.EIO;
        }
        // What the workers help with is waiting (disk, network). Copying data costs the same CPU
        // wherever it runs, so time in proportion to the payload (at 4 GB/s) is not counted; and a
        // call stretched by preemption on a busy machine is capped, so one such call cannot move
        // the connection to the workers (measured: under load that made 128k writes 1.4x slower).
        var elapsed = Stopwatch.GetTimestamp() - started - (request.Bytes * Stopwatch.Frequency / 4_000_000_000);
        var sample = Math.Clamp(elapsed, 0, 4 * _inlineThresholdTicks);
        var ewma = Volatile.Read(ref _ewmaTicks);
        Volatile.Write(ref _ewmaTicks, ewma + ((sample - ewma) / 8));
        // Before the reply: a client that has its answer finds the request in the figures (a worker's
        // count used to land just after, so stats read right then could miss it); and before Release:
        // once nothing is in flight, the figures are complete (Close folds them).
        Record(request.Type, result < 0 ? result : (int)request.Bytes, request.Started);
        try
        {
            Reply(request, result, payload);
        }
        finally
        {
            _server.NoteServed();
            Release(request);
        }
    }

    // The target's errno for a failed request (as a ublk queue counts it), bytes for READ and WRITE.
    private void Record(ushort type, int result, long started)
    {
        var op = NbdStatOps.Of(type);
        if (Environment.CurrentManagedThreadId == _threadId)
        {
            _stats!.Completed(op, result, started);
        }
        else
        {
            (Volatile.Read(ref _workerStats) ?? WorkerStats()).CompletedShared(op, result, started);
        }
    }

    private QueueStats WorkerStats()
    {
        Interlocked.CompareExchange(ref _workerStats, new QueueStats(), null);
        return _workerStats!;
    }

    /// <summary>This connection's figures now; null while it is in its handshake.</summary>
    public NbdConnectionStats? Stats()
    {
        var export = _statsExport;
        if (export is null)
        {
            return null;
        }
        var own = _stats!.Snapshot(-1, Volatile.Read(ref _inFlight));
        var workers = Volatile.Read(ref _workerStats);
        return new NbdConnectionStats(Id, Peer, export.Name, workers is null ? own : QueueStatsSnapshot.Sum(-1, [own, workers.Snapshot(-1)]));
    }

    private static string PeerOf(Socket socket)
    {
        try
        {
            if (socket.AddressFamily != AddressFamily.Unix)
            {
                return socket.RemoteEndPoint?.ToString() ?? "";
            }
            // A unix client has no address worth showing; its pid (SO_PEERCRED: pid, uid, gid) says who it is.
            Span<int> credentials = stackalloc int[3];
            return OperatingSystem.IsLinux() && socket.GetRawSocketOption(1, 17, MemoryMarshal.AsBytes(credentials)) == 12
                ? $"pid {credentials[0]}"
                : "unix";
        }
        catch (SocketException)
        {
            return "";
        }
    }

    private int Run(NbdRequest request, ReadOnlySpan<byte> writeData, out int payload)
    {
        payload = 0;
        var fua = (request.Flags & CmdFlagFua) != 0;
        switch (request.Type)
        {
            case CmdRead:
                return Read(request.Buffer.AsSpan(0, (int)request.Length), request.Offset);
            case CmdWrite:
                return Write(writeData, request.Offset, fua);
            case CmdBlockStatus:
                return BlockStatus(request, out payload);
            case CmdWriteZeroes when (request.Flags & CmdFlagFastZero) != 0 && !_export.CanFastZero:
                return -Errno.EOPNOTSUPP; // the protocol's answer to "zero fast, or not at all"
            default:
                break;
        }
        var r = Retry(request);
        if (r >= 0 && fua && request.Type is CmdTrim or CmdWriteZeroes)
        {
            r = Flush();
        }
        return r;
    }

    // Short steps, EAGAIN and EINTR: the one policy the ublk queues use too (RequestProgress).
    private int Read(Span<byte> buffer, long offset)
    {
        var progress = new RequestProgress(StepKind.Read, buffer.Length);
        int error;
        while (progress.Next(Filter(_target.Read(buffer[(int)progress.Done..], offset + progress.Done), true), out error))
        {
        }
        if (error == 0 && progress.ZeroRest)
        {
            // Past the end of a shorter backing file: the rest reads as zeros (as on ublk).
            buffer[(int)progress.Done..].Clear();
        }
        return error;
    }

    private int Write(ReadOnlySpan<byte> data, long offset, bool fua)
    {
        var progress = new RequestProgress(StepKind.Write, data.Length);
        int error;
        while (true)
        {
            var rest = data[(int)progress.Done..];
            var n = fua ? _target.WriteFua(rest, offset + progress.Done) : _target.Write(rest, offset + progress.Done);
            if (!progress.Next(Filter(n, true), out error))
            {
                return error;
            }
        }
    }

    private int Flush() => Retry(CmdFlush, 0, 0, 0);

    private int Retry(NbdRequest r) => Retry(r.Type, r.Flags, r.Offset, r.Length);

    private int Retry(ushort type, ushort flags, long offset, long length)
    {
        var progress = new RequestProgress(StepKind.Other, length);
        int error;
        while (true)
        {
            var r = type switch
            {
                CmdFlush => _target.Flush(),
                CmdTrim => _target.Discard(offset, length),
                CmdWriteZeroes => _target.WriteZeroes(offset, length, (flags & CmdFlagNoHole) == 0),
                CmdCache => _target.Cache(offset, length),
                _ => -Errno.EINVAL,
            };
            if (!progress.Next(Filter(r, false), out error))
            {
                return error;
            }
        }
    }

    private int Filter(int result, bool isData)
    {
        if (_filter is null)
        {
            return result;
        }
        lock (_filter)
        {
            return _filter.Apply(result, isData, _target.LogicalBlockSize);
        }
    }

    private int BlockStatus(NbdRequest request, out int payload)
    {
        payload = 0;
        var buffer = request.TakeBuffer(4 + (8 * MaxDescriptors));
        BinaryPrimitives.WriteUInt32BigEndian(buffer, BaseAllocationId);
        var max = (request.Flags & CmdFlagReqOne) != 0 ? 1 : MaxDescriptors;
        var position = request.Offset;
        var end = request.Offset + request.Length;
        var count = 0;
        uint runLength = 0;
        uint runFlags = 0;
        while (position < end)
        {
            var n = _target.GetAllocation(position, end - position, out var state);
            if (n < 0)
            {
                return (int)n;
            }
            if (n == 0 || n > end - position)
            {
                n = end - position;
                state = AllocationFlags.None;
            }
            var flags = (uint)state & (StateHole | StateZero);
            if (count > 0 && flags == runFlags)
            {
                runLength += (uint)n;
            }
            else
            {
                if (count == max)
                {
                    break;
                }
                if (count > 0)
                {
                    WriteDescriptor(buffer, count - 1, runLength, runFlags);
                }
                count++;
                runLength = (uint)n;
                runFlags = flags;
            }
            position += n;
        }
        WriteDescriptor(buffer, count - 1, runLength, runFlags);
        payload = 4 + (8 * count);
        return 0;
    }

    private static void WriteDescriptor(byte[] buffer, int index, uint length, uint flags)
    {
        BinaryPrimitives.WriteUInt32BigEndian(buffer.AsSpan(4 + (8 * index)), length);
        BinaryPrimitives.WriteUInt32BigEndian(buffer.AsSpan(8 + (8 * index)), flags);
    }

    private void Reply(NbdRequest request, int result, int payload)
    {
        if (result < 0)
        {
            ReplyError(request.Cookie, ToNbdError(result, request.Flags), null);
            return;
        }
        Span<byte> header = stackalloc byte[28];
        var structured = _session!.StructuredReplies;
        switch (request.Type)
        {
            case CmdRead when structured:
                StructuredHeader(header, ReplyTypeOffsetData, request.Cookie, 8 + request.Length);
                BinaryPrimitives.WriteUInt64BigEndian(header[20..], (ulong)request.Offset);
                _writer!.Send(header, request.Buffer.AsSpan(0, (int)request.Length));
                break;
            case CmdRead:
                SimpleHeader(header, 0, request.Cookie);
                _writer!.Send(header[..SimpleReplySize], request.Buffer.AsSpan(0, (int)request.Length));
                break;
            case CmdBlockStatus:
                StructuredHeader(header, ReplyTypeBlockStatus, request.Cookie, (uint)payload);
                _writer!.Send(header[..StructuredReplySize], request.Buffer.AsSpan(0, payload));
                break;
            default:
                SimpleHeader(header, 0, request.Cookie);
                _writer!.Send(header[..SimpleReplySize], ReadOnlySpan<byte>.Empty);
                break;
        }
    }

    /// <summary>
    /// An error reply: with structured replies an error chunk carrying a message for the user
    /// (and never a simple reply to a READ), else a simple reply.
    /// </summary>
    private void ReplyError(ulong cookie, uint error, string? message)
    {
        if (!_session!.StructuredReplies)
        {
            Span<byte> simple = stackalloc byte[SimpleReplySize];
            SimpleHeader(simple, error, cookie);
            _writer!.Send(simple, ReadOnlySpan<byte>.Empty);
            return;
        }
        var text = string.IsNullOrEmpty(message) ? [] : Encoding.UTF8.GetBytes(message.Length > 1000 ? message[..1000] : message);
        Span<byte> header = stackalloc byte[StructuredReplySize + 6];
        StructuredHeader(header, ReplyTypeError, cookie, (uint)(6 + text.Length));
        BinaryPrimitives.WriteUInt32BigEndian(header[20..], error);
        BinaryPrimitives.WriteUInt16BigEndian(header[24..], (ushort)text.Length);
        _writer!.Send(header, text);
    }

    private static void SimpleHeader(Span<byte> h, uint error, ulong cookie)
    {
        BinaryPrimitives.WriteUInt32BigEndian(h, SimpleReplyMagic);
        BinaryPrimitives.WriteUInt32BigEndian(h[4..], error);
        BinaryPrimitives.WriteUInt64BigEndian(h[8..], cookie);
    }

    private static void StructuredHeader(Span<byte> h, ushort type, ulong cookie, uint length)
    {
        BinaryPrimitives.WriteUInt32BigEndian(h, StructuredReplyMagic);
        BinaryPrimitives.WriteUInt16BigEndian(h[4..], ReplyFlagDone);
        BinaryPrimitives.WriteUInt16BigEndian(h[6..], type);
        BinaryPrimitives.WriteUInt64BigEndian(h[8..], cookie);
        BinaryPrimitives.WriteUInt32BigEndian(h[16..], length);
    }

    // ---- input ----

    /// <summary>
    /// Makes <paramref name="count"/> bytes available at _start. Replies held back for the batch
    /// go out before the thread blocks on the socket. False at the end of the stream.
    /// </summary>
    private bool Fill(int count)
    {
        if (_end - _start >= count)
        {
            return true;
        }
        if (_start == _end)
        {
            _start = _end = 0;
        }
        else if (_in.Length - _start < count)
        {
            Buffer.BlockCopy(_in, _start, _in, 0, _end - _start);
            _end -= _start;
            _start = 0;
        }
        _writer!.Uncork();
        while (_end - _start < count)
        {
            var n = _transport.Receive(_in.AsSpan(_end));
            if (n == 0)
            {
                return false;
            }
            _end += n;
        }
        _writer.Cork();
        return true;
    }

    /// <summary>Moves a WRITE's payload into its buffer: what is buffered, then straight from the socket.</summary>
    private bool ReceivePayload(byte[] buffer, int length)
    {
        var have = Math.Min(_end - _start, length);
        _in.AsSpan(_start, have).CopyTo(buffer);
        _start += have;
        if (have == length)
        {
            return true;
        }
        _writer!.Uncork();
        if (!_transport.ReceiveExactly(buffer.AsSpan(have, length - have)))
        {
            return false;
        }
        _writer.Cork();
        return true;
    }

    /// <summary>Reads and drops a refused WRITE's payload so the stream stays in step.</summary>
    private bool Skip(uint length)
    {
        long left = length;
        var have = (int)Math.Min(_end - _start, left);
        _start += have;
        left -= have;
        if (left == 0)
        {
            return true;
        }
        _writer!.Uncork();
        while (left > 0)
        {
            _start = _end = 0;
            var n = _transport.Receive(_in.AsSpan(0, (int)Math.Min(_in.Length, left)));
            if (n == 0)
            {
                return false;
            }
            left -= n;
        }
        _writer.Cork();
        return true;
    }

    // ---- in-flight bounds ----

    private NbdRequest Acquire(uint bytes)
    {
        lock (_gate)
        {
            if (CanEnter(bytes))
            {
                return Take(bytes);
            }
        }
        // Replies are what frees slots: let them go before waiting.
        _writer!.Uncork();
        NbdRequest request;
        lock (_gate)
        {
            while (!CanEnter(bytes))
            {
                _readerWaiting = true;
                Monitor.Wait(_gate);
            }
            request = Take(bytes);
        }
        _writer.Cork();
        return request;
    }

    private bool CanEnter(uint bytes)
        => _inFlight == 0 || (_inFlight < _free.Length && _inFlightBytes + bytes <= _options.MaxInFlightBytes);

    private NbdRequest Take(uint bytes)
    {
        _inFlight++;
        _inFlightBytes += bytes;
        var request = _freeCount > 0 ? _free[--_freeCount] : new NbdRequest(this);
        request.Bytes = bytes;
        return request;
    }

    private void Release(NbdRequest request)
    {
        request.ReturnBuffer();
        lock (_gate)
        {
            _inFlight--;
            _inFlightBytes -= request.Bytes;
            _free[_freeCount++] = request;
            if (_readerWaiting)
            {
                _readerWaiting = false;
                Monitor.PulseAll(_gate);
            }
        }
    }

    private void WaitIdle()
    {
        lock (_gate)
        {
            while (_inFlight > 0)
            {
                _readerWaiting = true;
                Monitor.Wait(_gate);
            }
        }
    }
}
