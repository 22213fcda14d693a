namespace UblkSharp.Ublk;

/// <summary>UBLK_F_* feature and device flags (GET_FEATURES, dev_info.flags).</summary>
[Flags]
public enum UblkFeatures : ulong
{
    None = 0,
    SupportZeroCopy = 1ul << 0,
    UringCmdCompInTask = 1ul << 1,
    NeedGetData = 1ul << 2,
    UserRecovery = 1ul << 3,
    UserRecoveryReissue = 1ul << 4,
    UnprivilegedDev = 1ul << 5,
    CmdIoctlEncode = 1ul << 6,
    UserCopy = 1ul << 7,
    Zoned = 1ul << 8,
    UserRecoveryFailIo = 1ul << 9,
    UpdateSize = 1ul << 10,
    AutoBufReg = 1ul << 11,
    Quiesce = 1ul << 12,
    PerIoDaemon = 1ul << 13,
    BufRegOffDaemon = 1ul << 14,
    BatchIo = 1ul << 15,
    Integrity = 1ul << 16,
    SafeStopDev = 1ul << 17,
    NoAutoPartScan = 1ul << 18,
    ShmemZc = 1ul << 19,
    IoDescSize = 1ul << 20,
}

public static class UblkFeatureNames
{
    private static readonly (UblkFeatures Flag, string Name, string Since)[] Table =
    [
        (UblkFeatures.SupportZeroCopy, "SUPPORT_ZERO_COPY", "6.15"),
        (UblkFeatures.UringCmdCompInTask, "URING_CMD_COMP_IN_TASK", "6.0"),
        (UblkFeatures.NeedGetData, "NEED_GET_DATA", "6.0"),
        (UblkFeatures.UserRecovery, "USER_RECOVERY", "6.1"),
        (UblkFeatures.UserRecoveryReissue, "USER_RECOVERY_REISSUE", "6.1"),
        (UblkFeatures.UnprivilegedDev, "UNPRIVILEGED_DEV", "6.3"),
        (UblkFeatures.CmdIoctlEncode, "CMD_IOCTL_ENCODE", "6.4"),
        (UblkFeatures.UserCopy, "USER_COPY", "6.5"),
        (UblkFeatures.Zoned, "ZONED", "6.6"),
        (UblkFeatures.UserRecoveryFailIo, "USER_RECOVERY_FAIL_IO", "6.13"),
        (UblkFeatures.UpdateSize, "UPDATE_SIZE", "6.16"),
        (UblkFeatures.AutoBufReg, "AUTO_BUF_REG", "6.16"),
        (UblkFeatures.Quiesce, "QUIESCE", "6.16"),
        (UblkFeatures.PerIoDaemon, "PER_IO_DAEMON", "6.16"),
        (UblkFeatures.BufRegOffDaemon, "BUF_REG_OFF_DAEMON", "6.17"),
        (UblkFeatures.BatchIo, "BATCH_IO", "7.0"),
        (UblkFeatures.Integrity, "INTEGRITY", "7.0"),
        (UblkFeatures.SafeStopDev, "SAFE_STOP_DEV", "7.0"),
        (UblkFeatures.NoAutoPartScan, "NO_AUTO_PART_SCAN", "7.0"),
        (UblkFeatures.ShmemZc, "SHMEM_ZC", "7.1"),
        // Offered by 7.3.4 (mask 0x1fffff); the release that added it is not pinned down here.
        (UblkFeatures.IoDescSize, "IO_DESC_SIZE", "7.3"),
    ];

    /// <summary>Every known flag with its name, the mainline release that added it, and whether <paramref name="mask"/> has it.</summary>
    public static IEnumerable<(UblkFeatures Flag, string Name, string Since, bool Present)> Describe(UblkFeatures mask)
    {
        foreach (var (flag, name, since) in Table)
        {
            yield return (flag, name, since, (mask & flag) != 0);
        }
    }

    /// <summary>"USER_RECOVERY|USER_COPY", with unknown bits as hex.</summary>
    public static string Format(UblkFeatures mask)
    {
        var names = new List<string>();
        var rest = mask;
        foreach (var (flag, name, _) in Table)
        {
            if ((mask & flag) != 0)
            {
                names.Add(name);
                rest &= ~flag;
            }
        }
        if (rest != 0)
        {
            names.Add($"0x{(ulong)rest:x}");
        }
        return names.Count == 0 ? "none" : string.Join('|', names);
    }
}
