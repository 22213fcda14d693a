using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using UblkSharp.Interop.IoUring;
using UblkSharp.Ublk;

namespace UblkSharp.Tests.Interop;

/// <summary>Every C# mirror of a kernel struct, flag and command number, checked against the C headers on this machine.</summary>
public class StructLayoutTests
{
    // (C struct, C# type, [(C field, C# field)])
    private static readonly (string C, Type Cs, (string CField, string CsField)[] Fields)[] Structs =
    [
        ("io_uring_sqe", typeof(Sqe),
        [
            ("opcode", "opcode"), ("flags", "flags"), ("ioprio", "ioprio"), ("fd", "fd"), ("off", "off"), ("addr2", "addr2"),
            ("cmd_op", "cmd_op"), ("__pad1", "__pad1"), ("addr", "addr"), ("len", "len"), ("rw_flags", "op_flags"),
            ("fsync_flags", "op_flags"), ("timeout_flags", "op_flags"), ("cancel_flags", "op_flags"), ("uring_cmd_flags", "op_flags"),
            ("user_data", "user_data"), ("buf_index", "buf_index"), ("personality", "personality"), ("file_index", "file_index"),
            ("addr3", "addr3"), ("__pad2", "__pad2"),
        ]),
        ("io_uring_cqe", typeof(Cqe), [("user_data", "user_data"), ("res", "res"), ("flags", "flags")]),
        ("io_sqring_offsets", typeof(SqringOffsets),
        [
            ("head", "head"), ("tail", "tail"), ("ring_mask", "ring_mask"), ("ring_entries", "ring_entries"), ("flags", "flags"),
            ("dropped", "dropped"), ("array", "array"), ("resv1", "resv1"), ("resv2", "resv2"),
        ]),
        ("io_cqring_offsets", typeof(CqringOffsets),
        [
            ("head", "head"), ("tail", "tail"), ("ring_mask", "ring_mask"), ("ring_entries", "ring_entries"), ("overflow", "overflow"),
            ("cqes", "cqes"), ("flags", "flags"), ("resv1", "resv1"), ("resv2", "resv2"),
        ]),
        ("io_uring_params", typeof(IoUringParams),
        [
            ("sq_entries", "sq_entries"), ("cq_entries", "cq_entries"), ("flags", "flags"), ("sq_thread_cpu", "sq_thread_cpu"),
            ("sq_thread_idle", "sq_thread_idle"), ("features", "features"), ("wq_fd", "wq_fd"), ("resv", "resv"),
            ("sq_off", "sq_off"), ("cq_off", "cq_off"),
        ]),
        ("io_uring_getevents_arg", typeof(GeteventsArg), [("sigmask", "sigmask"), ("sigmask_sz", "sigmask_sz"), ("pad", "pad"), ("ts", "ts")]),
        ("__kernel_timespec", typeof(KernelTimespec), [("tv_sec", "tv_sec"), ("tv_nsec", "tv_nsec")]),
        ("io_uring_rsrc_register", typeof(RsrcRegister), [("nr", "nr"), ("flags", "flags"), ("resv2", "resv2"), ("data", "data"), ("tags", "tags")]),
        ("io_uring_rsrc_update2", typeof(RsrcUpdate2),
        [
            ("offset", "offset"), ("resv", "resv"), ("data", "data"), ("tags", "tags"), ("nr", "nr"), ("resv2", "resv2"),
        ]),
        // 6.1 headers call flags "pad" (flags came with IOU_PBUF_RING_MMAP in 6.4).
        ("io_uring_buf_reg", typeof(BufReg), [("ring_addr", "ring_addr"), ("ring_entries", "ring_entries"), ("bgid", "bgid"), ("pad", "flags"), ("resv", "resv")]),
        ("io_uring_buf", typeof(ProvidedBuffer), [("addr", "addr"), ("len", "len"), ("bid", "bid"), ("resv", "resv")]),
        ("iovec", typeof(Iovec), [("iov_base", "iov_base"), ("iov_len", "iov_len")]),
        ("msghdr", typeof(MsgHdr),
        [
            ("msg_name", "msg_name"), ("msg_namelen", "msg_namelen"), ("msg_iov", "msg_iov"), ("msg_iovlen", "msg_iovlen"),
            ("msg_control", "msg_control"), ("msg_controllen", "msg_controllen"), ("msg_flags", "msg_flags"),
        ]),
        ("ublksrv_ctrl_cmd", typeof(CtrlCmd), [("dev_id", "dev_id"), ("queue_id", "queue_id"), ("len", "len"), ("addr", "addr"), ("data", "data")]),
        ("ublksrv_ctrl_dev_info", typeof(DevInfo),
        [
            ("nr_hw_queues", "nr_hw_queues"), ("queue_depth", "queue_depth"), ("state", "state"), ("pad0", "pad0"),
            ("max_io_buf_bytes", "max_io_buf_bytes"), ("dev_id", "dev_id"), ("ublksrv_pid", "ublksrv_pid"), ("pad1", "pad1"),
            ("flags", "flags"), ("ublksrv_flags", "ublksrv_flags"), ("reserved1", "reserved1"), ("reserved2", "reserved2"),
        ]),
        ("ublksrv_io_desc", typeof(IoDesc), [("op_flags", "op_flags"), ("nr_sectors", "nr_sectors"), ("start_sector", "start_sector"), ("addr", "addr")]),
        ("ublksrv_io_cmd", typeof(IoCmd), [("q_id", "q_id"), ("tag", "tag"), ("result", "result"), ("addr", "addr")]),
        ("ublk_param_basic", typeof(ParamBasic),
        [
            ("attrs", "attrs"), ("logical_bs_shift", "logical_bs_shift"), ("physical_bs_shift", "physical_bs_shift"),
            ("io_opt_shift", "io_opt_shift"), ("io_min_shift", "io_min_shift"), ("max_sectors", "max_sectors"),
            ("chunk_sectors", "chunk_sectors"), ("dev_sectors", "dev_sectors"), ("virt_boundary_mask", "virt_boundary_mask"),
        ]),
        ("ublk_param_discard", typeof(ParamDiscard),
        [
            ("discard_alignment", "discard_alignment"), ("discard_granularity", "discard_granularity"),
            ("max_discard_sectors", "max_discard_sectors"), ("max_write_zeroes_sectors", "max_write_zeroes_sectors"),
            ("max_discard_segments", "max_discard_segments"), ("reserved0", "reserved0"),
        ]),
    ];

    // Constants the binding hard-codes, by their C names.
    private static readonly (string C, ulong Cs)[] Constants =
    [
        ("IORING_SETUP_CQSIZE", (ulong)SetupFlags.CqSize), ("IORING_SETUP_COOP_TASKRUN", (ulong)SetupFlags.CoopTaskrun),
        ("IORING_SETUP_SQE128", (ulong)SetupFlags.Sqe128), ("IORING_SETUP_CQE32", (ulong)SetupFlags.Cqe32),
        ("IORING_SETUP_SINGLE_ISSUER", (ulong)SetupFlags.SingleIssuer), ("IORING_SETUP_DEFER_TASKRUN", (ulong)SetupFlags.DeferTaskrun),
        ("IORING_FEAT_SINGLE_MMAP", (ulong)RingFeatures.SingleMmap), ("IORING_FEAT_NODROP", (ulong)RingFeatures.NoDrop),
        ("IORING_FEAT_EXT_ARG", (ulong)RingFeatures.ExtArg),
        ("IORING_ENTER_GETEVENTS", 1), ("IORING_ENTER_EXT_ARG", 8), ("IORING_SQ_CQ_OVERFLOW", 2),
        ("IORING_OFF_SQ_RING", 0), ("IORING_OFF_CQ_RING", 0x8000000), ("IORING_OFF_SQES", 0x10000000),
        ("IORING_OP_NOP", (ulong)Opcode.Nop), ("IORING_OP_READV", (ulong)Opcode.Readv), ("IORING_OP_WRITEV", (ulong)Opcode.Writev),
        ("IORING_OP_FSYNC", (ulong)Opcode.Fsync), ("IORING_OP_READ_FIXED", (ulong)Opcode.ReadFixed),
        ("IORING_OP_WRITE_FIXED", (ulong)Opcode.WriteFixed), ("IORING_OP_TIMEOUT", (ulong)Opcode.Timeout),
        ("IORING_OP_ASYNC_CANCEL", (ulong)Opcode.AsyncCancel), ("IORING_OP_FALLOCATE", (ulong)Opcode.Fallocate),
        ("IORING_OP_READ", (ulong)Opcode.Read), ("IORING_OP_WRITE", (ulong)Opcode.Write), ("IORING_OP_URING_CMD", (ulong)Opcode.UringCmd),
        ("IORING_OP_SENDMSG", (ulong)Opcode.SendMsg), ("IORING_OP_RECVMSG", (ulong)Opcode.RecvMsg),
        ("IORING_OP_SEND", (ulong)Opcode.Send), ("IORING_OP_RECV", (ulong)Opcode.Recv),
        ("MSG_DONTWAIT", (ulong)MsgFlags.DontWait), ("MSG_WAITALL", (ulong)MsgFlags.WaitAll), ("MSG_NOSIGNAL", (ulong)MsgFlags.NoSignal),
        ("IOSQE_FIXED_FILE", (ulong)SqeFlags.FixedFile), ("IOSQE_IO_LINK", (ulong)SqeFlags.IoLink),
        ("IOSQE_ASYNC", (ulong)SqeFlags.Async), ("IOSQE_CQE_SKIP_SUCCESS", (ulong)SqeFlags.CqeSkipSuccess),
        ("IORING_FSYNC_DATASYNC", (ulong)FsyncFlags.DataSync), ("IORING_TIMEOUT_ABS", (ulong)TimeoutFlags.Absolute),
        ("IORING_ASYNC_CANCEL_ALL", (ulong)CancelFlags.All),
        ("IORING_REGISTER_BUFFERS", 0), ("IORING_REGISTER_FILES", 2), ("IORING_REGISTER_EVENTFD", 4), ("IORING_REGISTER_FILES_UPDATE", 6),
        ("IORING_REGISTER_BUFFERS2", (ulong)RegisterOp.Buffers2), ("IORING_REGISTER_BUFFERS_UPDATE", (ulong)RegisterOp.BuffersUpdate),
        ("IORING_RSRC_REGISTER_SPARSE", RsrcRegister.RegisterSparse),
        ("IORING_REGISTER_PBUF_RING", (ulong)RegisterOp.PbufRing), ("IORING_UNREGISTER_PBUF_RING", (ulong)RegisterOp.UnregisterPbufRing),
        ("IORING_CQE_F_BUFFER", CqeFlags.Buffer), ("IORING_CQE_F_MORE", CqeFlags.More), ("IORING_CQE_BUFFER_SHIFT", CqeFlags.BufferShift),
        ("IOSQE_BUFFER_SELECT", (ulong)SqeFlags.BufferSelect), ("offsetof(struct io_uring_sqe, buf_group)", 40),
        ("offsetof(struct io_uring_buf_ring, tail)", 14),
        ("RWF_DSYNC", (ulong)RwFlags.DSync), ("FALLOC_FL_PUNCH_HOLE", (ulong)FallocateMode.PunchHole),
        ("FALLOC_FL_ZERO_RANGE", (ulong)FallocateMode.ZeroRange), ("FALLOC_FL_KEEP_SIZE", (ulong)FallocateMode.KeepSize),
        ("UBLK_IO_OP_WRITE_ZEROES", (ulong)IoOp.WriteZeroes), ("UBLK_IO_F_FUA", (ulong)IoFlags.Fua), ("UBLK_IO_F_NOUNMAP", (ulong)IoFlags.NoUnmap),
        ("UBLK_F_USER_RECOVERY_REISSUE", (ulong)UblkFeatures.UserRecoveryReissue), ("UBLK_MAX_QUEUE_DEPTH", UblkCommands.MaxQueueDepth),
        ("UBLK_ATTR_VOLATILE_CACHE", ParamBasic.AttrVolatileCache), ("UBLK_ATTR_FUA", ParamBasic.AttrFua),
        ("UBLK_PARAM_TYPE_DISCARD", UblkParams.TypeDiscard),
        // The ioctl encodings, computed by the C macros from the installed header's struct sizes.
        ("_IOR('u', UBLK_CMD_GET_DEV_INFO, struct ublksrv_ctrl_cmd)", UblkCommands.GetDevInfo),
        ("_IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd)", UblkCommands.AddDev),
        ("_IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd)", UblkCommands.SetParams),
        ("_IOWR('u', UBLK_CMD_END_USER_RECOVERY, struct ublksrv_ctrl_cmd)", UblkCommands.EndUserRecovery),
        ("_IOR('u', 0x13, struct ublksrv_ctrl_cmd)", UblkCommands.GetFeatures),
        ("_IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd)", UblkCommands.FetchReq),
        ("_IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd)", UblkCommands.CommitAndFetchReq),
    ];

    private static readonly Lazy<Dictionary<string, ulong>> C = new(() =>
    {
        var values = new List<(string, string)>();
        foreach (var (c, _, fields) in Structs)
        {
            var tag = $"struct {c}";
            values.Add(($"sizeof:{c}", $"sizeof({tag})"));
            values.AddRange(fields.Select(f => ($"{c}.{f.CField}", $"offsetof({tag}, {f.CField})")));
        }
        values.Add(("io_uring_sqe.cmd", "offsetof(struct io_uring_sqe, cmd)"));
        values.AddRange(Constants.Select((k, i) => ($"const{i}", k.C)));
        return CHeader.Evaluate(["linux/io_uring.h", "linux/ublk_cmd.h", "linux/falloc.h", "linux/fs.h", "linux/ioctl.h", "sys/uio.h", "sys/socket.h"], values);
    });

    public static TheoryData<string> StructNames() => [.. Structs.Select(s => s.C)];

    [Theory]
    [MemberData(nameof(StructNames))]
    public void StructMatchesCHeader(string name)
    {
        var (c, cs, fields) = Structs.Single(s => s.C == name);
        Assert.Equal(C.Value[$"sizeof:{c}"], (ulong)SizeOf(cs));
        foreach (var (cField, csField) in fields)
        {
            Assert.True((ulong)Marshal.OffsetOf(cs, csField) == C.Value[$"{c}.{cField}"], $"{c}.{cField}: C# {Marshal.OffsetOf(cs, csField)}, C {C.Value[$"{c}.{cField}"]}");
        }
    }

    [Fact]
    public void UringCmdPayloadStartsWhereTheHeaderSays() => Assert.Equal((ulong)Sqe.CmdOffset, C.Value["io_uring_sqe.cmd"]);

    [Fact]
    public void ConstantsMatchCHeader()
    {
        for (var i = 0; i < Constants.Length; i++)
        {
            Assert.True(C.Value[$"const{i}"] == Constants[i].Cs, $"{Constants[i].C}: C 0x{C.Value[$"const{i}"]:x}, C# 0x{Constants[i].Cs:x}");
        }
    }

    /// <summary>
    /// The installed headers are Linux 6.1's; members added later are checked against the offsets in
    /// the 6.12 and mainline uapi (ublk_cmd.h), as recorded in the project's protocol notes.
    /// </summary>
    [Fact]
    public void NewerUblkMembersMatchTheLaterUapi()
    {
        Assert.Equal(24, (int)Marshal.OffsetOf<CtrlCmd>(nameof(CtrlCmd.dev_path_len)));
        Assert.Equal(40, (int)Marshal.OffsetOf<DevInfo>(nameof(DevInfo.owner_uid)));
        Assert.Equal(44, (int)Marshal.OffsetOf<DevInfo>(nameof(DevInfo.owner_gid)));
        Assert.Equal(16, Unsafe.SizeOf<ParamDevt>());
        Assert.Equal(32, Unsafe.SizeOf<ParamZoned>());
        Assert.Equal(8, (int)Marshal.OffsetOf<UblkParams>(nameof(UblkParams.basic)));
        Assert.Equal(40, (int)Marshal.OffsetOf<UblkParams>(nameof(UblkParams.discard)));
        Assert.Equal(60, (int)Marshal.OffsetOf<UblkParams>(nameof(UblkParams.devt)));
        Assert.Equal(76, (int)Marshal.OffsetOf<UblkParams>(nameof(UblkParams.zoned)));
        Assert.Equal(108, (int)Marshal.OffsetOf<UblkParams>(nameof(UblkParams.dma)));
        Assert.Equal(120, (int)Marshal.OffsetOf<UblkParams>(nameof(UblkParams.seg)));
        Assert.Equal(UblkParams.Size612, (int)Marshal.OffsetOf<UblkParams>(nameof(UblkParams.dma)));
        Assert.Equal(0x80207513u, UblkCommands.GetFeatures);
        Assert.Equal(0xc0207506u, UblkCommands.StartDev);
        Assert.Equal(0xc0107521u, UblkCommands.CommitAndFetchReq);
        Assert.Equal(98304L, UblkCommands.DescriptorOffset(1));
        Assert.Equal(4096L, UblkCommands.DescriptorLength(128));
    }

    /// <summary>
    /// Newer than the installed 6.1 header: values as the mainline uapi (ublk_cmd.h, 7.x) defines
    /// them: _IOWR('u', 0x15/0x16/0x17, struct ublksrv_ctrl_cmd) with its 32 bytes, and the UBLK_F_* bits.
    /// </summary>
    [Fact]
    public void SevenXControlCommandsAndFlagsMatchTheLaterUapi()
    {
        Assert.Equal(0xc0207515u, UblkCommands.UpdateSize);     // UBLK_U_CMD_UPDATE_SIZE
        Assert.Equal(0xc0207516u, UblkCommands.QuiesceDev);     // UBLK_U_CMD_QUIESCE_DEV
        Assert.Equal(0xc0207517u, UblkCommands.TryStopDev);     // UBLK_U_CMD_TRY_STOP_DEV
        Assert.Equal(0x80207514u, UblkCommands.DelDevAsync);    // UBLK_U_CMD_DEL_DEV_ASYNC (_IOR)
        Assert.Equal(1ul << 9, (ulong)UblkFeatures.UserRecoveryFailIo);
        Assert.Equal(1ul << 10, (ulong)UblkFeatures.UpdateSize);
        Assert.Equal(1ul << 12, (ulong)UblkFeatures.Quiesce);
        Assert.Equal(1ul << 17, (ulong)UblkFeatures.SafeStopDev);
        Assert.Equal(1ul << 18, (ulong)UblkFeatures.NoAutoPartScan);
        Assert.Equal(1ul << 19, (ulong)UblkFeatures.ShmemZc);
        Assert.Equal(1ul << 20, (ulong)UblkFeatures.IoDescSize);
        // `ublksharp features` names every bit up to 20: no bit of 7.3's mask 0x1fffff goes unnamed.
        Assert.Equal(21, UblkFeatureNames.Describe((UblkFeatures)0x1fffff).Count(f => f.Present));
        Assert.DoesNotContain("0x", UblkFeatureNames.Format((UblkFeatures)0x1fffff));
    }

    private static int SizeOf(Type t) => (int)typeof(Unsafe).GetMethod(nameof(Unsafe.SizeOf))!.MakeGenericMethod(t).Invoke(null, null)!;
}
